//! The operator's rules for narrower tokens (`TOKENHUB_TOKEN_RULES`): which
//! scopes and audiences the members of a hub group may ask for. Checked
//! before any cache is looked at; a refusal names the rule.

use crate::config::TokenRule;

/// Whether `rule` is for someone in `groups`.
fn applies(rule: &TokenRule, groups: &[String]) -> bool {
    rule.groups.iter().any(|g| g == "*" || groups.contains(g))
}

/// What in a request `rule` does not allow, if anything.
fn outside(rule: &TokenRule, scopes: &[String], audience: Option<&str>) -> Option<String> {
    if let Some(scope) = scopes.iter().find(|s| !rule.scopes.contains(s)) {
        return Some(format!("scope {scope:?} is not among its scopes ({})", list(&rule.scopes)));
    }
    match audience {
        Some(audience) if !rule.audiences.iter().any(|a| a == audience) => {
            Some(format!("audience {audience:?} is not among its audiences ({})", list(&rule.audiences)))
        }
        _ => None,
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "none".into() } else { items.join(", ") }
}

/// The bearer-token file's token for a member of `groups`, as the first
/// rule for one of the groups that names one gives it.
pub fn bearer_default<'a>(rules: &'a [TokenRule], groups: &[String]) -> Option<&'a crate::config::BearerDefault> {
    rules.iter().filter(|r| applies(r, groups)).find_map(|r| r.bearer.as_ref())
}

/// Allows a request for `scopes` and `audience` by a member of `groups`
/// when one rule for one of the groups holds all of it; otherwise says why,
/// naming the closest rule (or that none is for these groups).
pub fn check(rules: &[TokenRule], groups: &[String], scopes: &[String], audience: Option<&str>) -> Result<(), String> {
    let mine: Vec<&TokenRule> = rules.iter().filter(|r| applies(r, groups)).collect();
    let mut refusals = Vec::new();
    for rule in &mine {
        match outside(rule, scopes, audience) {
            None => return Ok(()),
            Some(why) => refusals.push(format!("rule {:?}: {why}", rule.name)),
        }
    }
    if rules.is_empty() {
        return Err("this hub allows no narrower tokens (TOKENHUB_TOKEN_RULES is empty)".into());
    }
    if mine.is_empty() {
        let groups = if groups.is_empty() { "none".to_string() } else { groups.join(", ") };
        return Err(format!("no rule of TOKENHUB_TOKEN_RULES is for your hub groups ({groups})"));
    }
    Err(format!("outside the operator's rules: {}", refusals.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, groups: &[&str], scopes: &[&str], audiences: &[&str]) -> TokenRule {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        TokenRule { name: name.into(), groups: own(groups), scopes: own(scopes), audiences: own(audiences), bearer: None }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_request_needs_one_rule_that_holds_all_of_it() {
        let rules = [
            rule("readers", &["*"], &["storage.read"], &["https://storage.example"]),
            rule("writers", &["physics"], &["storage.read", "storage.modify"], &["https://storage.example"]),
        ];
        let aud = Some("https://storage.example");
        assert_eq!(check(&rules, &[], &strings(&["storage.read"]), aud), Ok(()));
        assert_eq!(check(&rules, &strings(&["physics"]), &strings(&["storage.read", "storage.modify"]), aud), Ok(()));
        let refused = check(&rules, &strings(&["users"]), &strings(&["storage.modify"]), aud).unwrap_err();
        assert!(refused.contains("rule \"readers\"") && refused.contains("storage.modify"), "{refused}");
        let refused = check(&rules, &strings(&["physics"]), &strings(&["storage.read"]), Some("https://other.example"));
        assert!(refused.unwrap_err().contains("audience \"https://other.example\""));
        // The scopes of two rules are not added up.
        let split = [rule("a", &["*"], &["x"], &[]), rule("b", &["*"], &["y"], &[])];
        assert!(check(&split, &[], &strings(&["x", "y"]), None).is_err());
        assert_eq!(check(&split, &[], &strings(&["y"]), None), Ok(()));
    }

    #[test]
    fn a_refusal_says_when_no_rule_is_for_the_user() {
        let rules = [rule("physicists", &["physics"], &["storage.read"], &[])];
        let refused = check(&rules, &strings(&["chemistry"]), &strings(&["storage.read"]), None).unwrap_err();
        assert!(refused.contains("no rule") && refused.contains("chemistry"), "{refused}");
        assert!(check(&[], &[], &strings(&["storage.read"]), None).unwrap_err().contains("TOKENHUB_TOKEN_RULES is empty"));
    }
}
