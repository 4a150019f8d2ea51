-- Each running server's own hub API token (its JUPYTERHUB_API_TOKEN, which
-- the hub's spawn hook hands over), sealed. tokenhub presents it to that
-- server alone to write the token file: a credential the server already
-- holds, so a server that records what it receives learns nothing new.
CREATE TABLE server_credentials (
    username    TEXT    NOT NULL,
    server_name TEXT    NOT NULL,
    -- SHA-256 of the token: a notebook call presenting it is known to come
    -- from this server (a shared server's token gets no tokens).
    token_hash  TEXT    NOT NULL,
    token       BYTEA   NOT NULL,
    created_at  BIGINT  NOT NULL,
    PRIMARY KEY (username, server_name)
);
CREATE INDEX server_credentials_by_hash ON server_credentials (token_hash);

-- A hub name belongs to one upstream identity (issuer, subject), bound at
-- the name's first login. Kept through revocations and new logins; only an
-- operator moves a name to another subject.
CREATE TABLE name_bindings (
    username   TEXT    NOT NULL,
    issuer     TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    moved_by   TEXT,
    PRIMARY KEY (username, issuer)
);

-- Lineages stored before bindings existed are bound to their subject now.
INSERT INTO name_bindings (username, issuer, subject, created_at)
    SELECT username, issuer, subject, created_at FROM lineages;
