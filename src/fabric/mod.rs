//! FABRIC: tokenhub as a broker in front of the Credential Manager, so
//! that FABlib, which refreshes by itself, refreshes through tokenhub's
//! single flight instead of burning the refresh token under it
//! ([`broker`]). The CM as tokenhub calls it is [`crate::oauth::credmgr`];
//! what a server gets is [`crate::tokens::fabric`]; docs/fabric.md tells
//! the deployment.

pub mod broker;
