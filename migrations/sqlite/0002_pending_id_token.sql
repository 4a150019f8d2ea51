-- A refresh's ID token that could not be verified yet (its key set was not
-- reachable): sealed, kept beside the last verified one until it is checked.
ALTER TABLE lineages ADD COLUMN pending_id_token BLOB;
-- The nonce of the login that began the lineage: a refreshed ID token that
-- carries a nonce must carry this one (OpenID Connect Core 12.2).
ALTER TABLE lineages ADD COLUMN login_nonce TEXT;
