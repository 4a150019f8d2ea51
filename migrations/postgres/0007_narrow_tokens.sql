-- Narrower tokens (fewer scopes, another audience) obtained from a user's
-- lineage, sealed, one per (user, issuer, request): the request key is the
-- sorted scopes and the audience. A row answers only the lineage it was
-- obtained from: the same subject and the same login (login_at is the
-- lineage's created_at); a new login leaves older rows unanswered.
CREATE TABLE narrow_tokens (
    username     TEXT    NOT NULL,
    issuer       TEXT    NOT NULL,
    request_key  TEXT    NOT NULL,
    scopes       TEXT    NOT NULL,
    audience     TEXT,
    subject      TEXT    NOT NULL,
    login_at     BIGINT NOT NULL,
    access_token BYTEA NOT NULL,
    expires_at   BIGINT,
    obtained_at  BIGINT NOT NULL,
    PRIMARY KEY (username, issuer, request_key)
);

-- Hub services that fetched a user's narrower tokens by delegation: shown
-- on the user's token page (each fetch is also in the audit log).
CREATE TABLE delegations (
    username   TEXT    NOT NULL,
    issuer     TEXT    NOT NULL,
    service    TEXT    NOT NULL,
    first_at   BIGINT NOT NULL,
    last_at    BIGINT NOT NULL,
    fetches    BIGINT NOT NULL,
    PRIMARY KEY (username, issuer, service)
);
