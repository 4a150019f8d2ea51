-- The vault: one token lineage per user per issuer. Token values and claims
-- are envelopes sealed by tokenhub (never plaintext).
CREATE TABLE lineages (
    username          TEXT    NOT NULL,
    issuer            TEXT    NOT NULL,
    subject           TEXT    NOT NULL,
    access_token      BYTEA    NOT NULL,
    id_token          BYTEA    NOT NULL,
    refresh_token     BYTEA,
    claims            BYTEA    NOT NULL,
    scope             TEXT    NOT NULL,
    access_expires_at BIGINT ,
    version           BIGINT  NOT NULL,
    status            TEXT    NOT NULL,
    created_at        BIGINT  NOT NULL,
    updated_at        BIGINT  NOT NULL,
    refreshed_at      BIGINT ,
    -- SHA-256 of the refresh token the last refresh rotated away, and when:
    -- a late caller presenting it within a short window gets the current set.
    previous_refresh_hash TEXT,
    rotated_at        BIGINT,
    -- The refresh lease: one replica refreshes a lineage at a time.
    lease_holder      TEXT,
    lease_until       BIGINT,
    PRIMARY KEY (username, issuer)
);

-- Authorization codes issued to the hub, stored by SHA-256 hash; single use.
CREATE TABLE hub_codes (
    code_hash      TEXT    PRIMARY KEY,
    username       TEXT    NOT NULL,
    issuer         TEXT    NOT NULL,
    client_id      TEXT    NOT NULL,
    redirect_uri   TEXT    NOT NULL,
    code_challenge TEXT,
    scope          TEXT    NOT NULL,
    expires_at     BIGINT  NOT NULL
);

-- Access and refresh tokens issued to the hub, stored by SHA-256 hash.
CREATE TABLE hub_tokens (
    token_hash TEXT    PRIMARY KEY,
    kind       TEXT    NOT NULL,
    username   TEXT    NOT NULL,
    issuer     TEXT    NOT NULL,
    client_id  TEXT    NOT NULL,
    scope      TEXT    NOT NULL,
    expires_at BIGINT  NOT NULL,
    created_at BIGINT  NOT NULL
);
CREATE INDEX hub_tokens_user ON hub_tokens (username, issuer);
