-- The FABRIC broker finds a lineage by the refresh token a client presents:
-- refresh_hash is the SHA-256 of the current one (NULL without one), and
-- refresh_predecessors holds the ones it replaced, for a while, so that a
-- retry or a kernel still holding one gets the current answer.
-- fabric_token is the Credential Manager's last answer, sealed.
-- All additions: replicas of the previous version keep serving beside them.
ALTER TABLE lineages ADD COLUMN refresh_hash TEXT;
ALTER TABLE lineages ADD COLUMN fabric_token BLOB;
CREATE INDEX lineages_refresh_hash ON lineages (refresh_hash);

CREATE TABLE refresh_predecessors (
    refresh_hash TEXT    PRIMARY KEY,
    username     TEXT    NOT NULL,
    issuer       TEXT    NOT NULL,
    rotated_at   INTEGER NOT NULL
);
CREATE INDEX refresh_predecessors_lineage ON refresh_predecessors (username, issuer, rotated_at);
