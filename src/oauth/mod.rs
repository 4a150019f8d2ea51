//! OpenID Connect on both sides of tokenhub. Towards the hub, tokenhub is
//! the OAuth 2.0 provider of its one client: [`login`] is the browser half
//! (`/oauth2/authorize`, `/callback`), [`provider`] the machine half
//! (discovery, `/oauth2/token`, `/oauth2/userinfo`). Towards the upstream
//! IdP, tokenhub is a relying party: [`upstream`]; in a FABRIC deployment
//! its refreshes go through the Credential Manager: [`credmgr`].

pub mod credmgr;
pub mod login;
pub mod provider;
pub mod upstream;
