//! Delegation: a hub service fetching a named user's narrower token
//! (what DIRAC calls limited delegation), for a scheduler, dask-gateway or
//! a cron service acting for a user whose notebook has stopped.
//!
//! Three things must all allow it: the service's hub token holds
//! `custom:<tokenhub's service name>:delegate` for that user (unfiltered,
//! or with the hub's `!user=<name>` or `!group=<one of theirs>` filter);
//! the operator gave the service a cap (`TOKENHUB_DELEGATION`) that holds
//! the request; and the user's own rules allow it. The token comes through
//! [`super::narrow`], so it is the user's alone and obtained once. Every
//! fetch is audited naming the service and the user, and counted for the
//! user's token page. A service never gets the lineage's own tokens.

use crate::config::DelegationCap;
use crate::hub::ServiceIdentity;
use crate::state::AppState;
use crate::time::now;
use crate::tokens::narrow::{self, NarrowError, NarrowRequest};
use crate::vault::narrow::NarrowToken;

/// The custom scope that lets a service's token fetch users' tokens.
pub fn delegate_scope(app: &AppState) -> String {
    format!("custom:{}:delegate", app.config.hub.service_name)
}

/// Whether the service's token holds `scope` for `user`: unfiltered, for
/// that user, or for one of their groups.
pub fn may_act_for(service: &ServiceIdentity, scope: &str, user: &str, groups: &[String]) -> bool {
    service.scopes.iter().any(|held| match held.strip_prefix(scope) {
        Some("") => true,
        Some(filter) => match filter.strip_prefix('!').and_then(|f| f.split_once('=')) {
            Some(("user", name)) => name == user,
            Some(("group", group)) => groups.iter().any(|g| g == group),
            _ => false,
        },
        None => false,
    })
}

/// Whether `request` fits the operator's cap for the service; why not otherwise.
pub fn within_cap(caps: &[DelegationCap], service: &str, request: &NarrowRequest) -> Result<(), String> {
    let Some(cap) = caps.iter().find(|c| c.service == service) else {
        return Err(format!("the operators gave the service {service:?} no delegation (TOKENHUB_DELEGATION)"));
    };
    if let Some(scope) = request.scopes.iter().find(|s| !cap.scopes.contains(s)) {
        return Err(format!("scope {scope:?} is beyond the cap of the service {service:?} (TOKENHUB_DELEGATION)"));
    }
    if let Some(audience) = request.audience.as_deref().filter(|a| !cap.audiences.iter().any(|c| c == a)) {
        return Err(format!("audience {audience:?} is beyond the cap of the service {service:?} (TOKENHUB_DELEGATION)"));
    }
    Ok(())
}

/// A narrower token of `user` for `service`, when all three allow it.
pub async fn token(
    app: &AppState,
    service: &ServiceIdentity,
    user: &str,
    request: &NarrowRequest,
    min_valid: Option<i64>,
) -> Result<NarrowToken, NarrowError> {
    let refused = |why: String| {
        app.audit.record("delegation_refused", Some(user), None, Some(&format!("service {:?}: {why}", service.name)));
        NarrowError::NotAllowed(why)
    };
    let groups = app.hub.groups(user).await?;
    let scope = delegate_scope(app);
    if !may_act_for(service, &scope, user, &groups) {
        return Err(refused(format!("the token of the service {:?} does not hold {scope} for {user:?}", service.name)));
    }
    within_cap(&app.config.narrow.delegation, &service.name, request).map_err(refused)?;
    let token = narrow::token(app, user, request, narrow::Freshness::MinValid(min_valid)).await?;
    let issuer = app.upstream.issuer();
    if let Err(e) = app.vault.store().record_delegation(user, issuer, &service.name, now()).await {
        tracing::warn!(user = %user, service = %service.name, error = %e, "a delegated fetch was not counted");
    }
    let detail = format!("service {:?} fetched {}", service.name, request.key());
    app.audit.record("delegated_fetch", Some(user), None, Some(&detail));
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(scopes: &[&str]) -> ServiceIdentity {
        ServiceIdentity { name: "dask-gateway".into(), scopes: scopes.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn the_hubs_filters_say_for_whom() {
        let scope = "custom:tokenhub:delegate";
        let physics = vec!["physics".to_string()];
        assert!(may_act_for(&service(&[scope]), scope, "alice", &[]));
        assert!(may_act_for(&service(&["custom:tokenhub:delegate!user=alice"]), scope, "alice", &[]));
        assert!(!may_act_for(&service(&["custom:tokenhub:delegate!user=alice"]), scope, "alicia", &[]));
        assert!(may_act_for(&service(&["custom:tokenhub:delegate!group=physics"]), scope, "bob", &physics));
        assert!(!may_act_for(&service(&["custom:tokenhub:delegate!group=physics"]), scope, "bob", &[]));
        // Neither a longer scope name, another filter nor another service's scope.
        assert!(!may_act_for(&service(&["custom:tokenhub:delegates"]), scope, "alice", &[]));
        assert!(!may_act_for(&service(&["custom:tokenhub:delegate!server=alice/"]), scope, "alice", &[]));
        assert!(!may_act_for(&service(&["custom:other:delegate", "access:services"]), scope, "alice", &[]));
    }

    #[test]
    fn a_cap_holds_the_whole_request() {
        let caps = [DelegationCap {
            service: "dask-gateway".into(),
            scopes: vec!["storage.read".into()],
            audiences: vec!["https://storage.example".into()],
        }];
        let request = |scopes: &[&str], audience: Option<&str>| NarrowRequest {
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            audience: audience.map(str::to_string),
        };
        assert_eq!(within_cap(&caps, "dask-gateway", &request(&["storage.read"], Some("https://storage.example"))), Ok(()));
        assert!(within_cap(&caps, "dask-gateway", &request(&["storage.modify"], None)).is_err());
        assert!(within_cap(&caps, "dask-gateway", &request(&[], Some("https://other.example"))).is_err());
        assert!(within_cap(&caps, "cron", &request(&["storage.read"], None)).unwrap_err().contains("no delegation"));
    }
}
