//! The user's tokens after login: kept fresh and handed on. [`refresh`]
//! refreshes a lineage once for all callers (single flight, the database
//! lease across replicas), with what it remembers in this process in
//! [`refresher`]; [`keepalive`] refreshes lineages of running servers before
//! their refresh tokens die unused; [`delivery`] writes the token file into
//! running servers, with its book-keeping in [`deliveries`]; [`fabric`] is
//! that file's format; [`revoke`] ends a lineage at the IdP and in the vault;
//! [`narrow`] has narrower tokens (fewer scopes, another audience) from a
//! lineage through the same single flight, within the operator's [`rules`];
//! [`delegation`] lets hub services fetch them for a user, within a cap;
//! [`files`] keeps files of them fresh in running servers.

pub mod delegation;
pub mod deliveries;
pub mod delivery;
pub mod fabric;
pub mod files;
pub mod keepalive;
pub mod narrow;
pub mod refresh;
pub mod refresher;
pub mod revoke;
pub mod rules;
pub mod sharing;
