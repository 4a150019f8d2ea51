//! What a person sees in the browser: the token page, `/refresh`, the
//! download and revocation ([`pages`]), the page after a renewal
//! ([`renewed`]), tokenhub's own session cookie ([`session`]) and the HTML
//! templates ([`views`]). The operator's pages are in [`crate::admin`].

pub mod pages;
pub mod renewed;
pub mod session;
pub mod views;
