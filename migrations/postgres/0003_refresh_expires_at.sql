-- When the refresh token dies unless it is used, from the IdP's
-- `refresh_expires_in` (Keycloak sends it); keep-alive refreshes before then.
-- NULL: the IdP did not say (keep-alive then goes by its idle-timeout setting).
ALTER TABLE lineages ADD COLUMN refresh_expires_at BIGINT;
