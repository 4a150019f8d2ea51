-- Why the IdP refused the lineage's last refresh (its error and
-- description), shown to the user and the operators; NULL while active.
ALTER TABLE lineages ADD COLUMN dead_reason TEXT;
