-- The operator's listing and /metrics count lineages by state on every
-- request: a covering index lets the database count from the index instead
-- of the table, whose rows are wide with sealed tokens (at 10,000 lineages
-- on SQLite, the count fell from about 30 ms to under 1 ms;
-- benches/operator_view.rs measures it).
CREATE INDEX lineages_by_status ON lineages (status, username, issuer, refreshed_at, access_expires_at);
