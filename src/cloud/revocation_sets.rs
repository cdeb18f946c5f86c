//! Revoking many roles with one IAM write.
//!
//! IAM throttles writes per account (tens a second). Revoking role by role
//! (a deny-all inline policy each) makes the last of a burst of ended
//! workloads wait its turn: 500 of them take 25 s at 20 writes a second.
//! Instead, each role ephemera makes carries, as its permissions boundary,
//! one of a few customer-managed policies of this cluster: the revocation
//! sets. A set allows everything (a permissions boundary only limits) and
//! denies everything to the roles whose `ephemera.dev/revocation` tag is in
//! its list. Revoking is adding the role's key to its set's list: one
//! `CreatePolicyVersion` revokes every role that ended since the last one.
//! An explicit deny in a permissions boundary applies to every session of
//! the role, old and new, and to what resource policies grant it directly.
//!
//! A role whose boundaries name a permissions boundary of their own cannot
//! carry a set (a role has one) and is revoked with its own deny-all inline
//! policy, as is a role when its set is full.
//!
//! A set also denies the role's own sessions what would undo it, should a
//! boundary allow IAM actions: changing any role's permissions boundary
//! under the root, and writing or removing `ephemera.dev/*` tags (the
//! revocation key and the ownership tags).
//!
//! Keys derive from the lease's uid, never reused: a key of a deleted role
//! is dropped from its set at the set's next write, and keeping it a while
//! longer denies nothing that lives. A set's policy keeps at most five
//! versions (IAM's limit): before a new one is made the oldest other goes.
//! Only the leading replica writes: it loads the sets once it leads, and
//! checks its fence before each write, so a replica frozen past its Lease
//! does not write a version from a stale list over the new leader's (which
//! would drop the keys the new leader added). A new leader starts from what
//! the default versions say.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::Arc,
    time::SystemTime,
};

use serde_json::{Value, json};
use tokio::sync::{Mutex, oneshot};

use super::{aws::AwsProvider, gate::Urgency, naming};
use crate::{Error, Result};

/// The role tag whose value a set lists.
pub const TAG_REVOCATION: &str = "ephemera.dev/revocation";
/// Stands in for an empty list (a condition needs a value; no key is it).
const NONE: &str = "none";
/// Most keys a set lists: a managed policy's document is at most 6,144
/// characters without whitespace; a key takes 15 of them, the statements
/// about 700.
pub const CAPACITY: usize = 350;
/// Versions IAM keeps of one managed policy.
const MAX_VERSIONS: usize = 5;
/// Older versions kept: the rest are deleted between revocations, so the
/// next ones find room (three free of five).
const SPARE: usize = 1;

/// The key of a lease's role in its set.
#[must_use]
pub fn key_of(lease_uid: &str) -> String {
    naming::hex_digest(&format!("revocation/{lease_uid}"), 12)
}

/// A set's document: everything allowed but to the roles `keys` names,
/// and nothing that would undo the set to any role under `roles` (an ARN
/// pattern: the role path root's).
#[must_use]
pub fn document(keys: &BTreeSet<String>, roles: &str) -> Value {
    let listed: Vec<&str> = if keys.is_empty() { vec![NONE] } else { keys.iter().map(String::as_str).collect() };
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "EphemeraBoundary", "Effect": "Allow", "Action": "*", "Resource": "*"},
            {"Sid": "EphemeraRevoked", "Effect": "Deny", "Action": "*", "Resource": "*",
             "Condition": {"StringEquals": {format!("aws:PrincipalTag/{TAG_REVOCATION}"): listed}}},
            {"Sid": "EphemeraKeepsBoundary", "Effect": "Deny",
             "Action": ["iam:DeleteRolePermissionsBoundary", "iam:PutRolePermissionsBoundary"], "Resource": roles},
            {"Sid": "EphemeraKeepsTags", "Effect": "Deny", "Action": ["iam:TagRole", "iam:UntagRole"], "Resource": roles,
             "Condition": {"ForAnyValue:StringLike": {"aws:TagKeys": "ephemera.dev/*"}}},
        ],
    })
}

/// The keys a set's document lists.
fn keys_in(document: &Value) -> BTreeSet<String> {
    let statements = document["Statement"].as_array().cloned().unwrap_or_default();
    let condition = statements
        .iter()
        .find(|s| s["Sid"] == "EphemeraRevoked")
        .map(|s| s["Condition"]["StringEquals"][format!("aws:PrincipalTag/{TAG_REVOCATION}")].clone())
        .unwrap_or_default();
    let keys = match condition {
        Value::String(one) => vec![one],
        Value::Array(many) => many.into_iter().filter_map(|k| k.as_str().map(str::to_owned)).collect(),
        _ => vec![],
    };
    keys.into_iter().filter(|k| k != NONE).collect()
}

/// This cluster's revocation sets.
pub struct RevocationSets {
    provider: AwsProvider,
    names: Vec<String>,
    arns: Vec<String>,
    path: String,
    /// The ARN pattern of the roles under the root.
    roles: String,
    /// Leadership, confirmed before each write (`None`: a single replica).
    fence: Option<Arc<crate::controller::Fence>>,
    sets: Vec<Mutex<Set>>,
}

impl std::fmt::Debug for RevocationSets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationSets").field("arns", &self.arns).finish_non_exhaustive()
    }
}

/// What one set lists, as its default version says, and its older versions.
#[derive(Default)]
struct Set {
    keys: BTreeSet<String>,
    /// Keys of roles deleted since: left out of the next version.
    gone: BTreeSet<String>,
    /// Versions other than the default, oldest first.
    older: VecDeque<String>,
    /// Revocations waiting for the next write (a write in flight takes all).
    waiting: Vec<(String, oneshot::Sender<Revoked>)>,
    /// Whether a write is in flight.
    writing: bool,
    /// Whether old versions are being deleted (to keep room for the next).
    trimming: bool,
    /// Old versions being deleted: IAM still counts them.
    deleting: usize,
    /// Whether the last write turned revocations away (said once, when it
    /// starts, not at every write while it lasts).
    full: bool,
}

impl Set {
    /// The old version to delete before the next one is made, when IAM's
    /// five would otherwise be exceeded (versions being deleted still count).
    fn to_make_room(&self) -> Option<String> {
        (self.older.len() + self.deleting + 1 >= MAX_VERSIONS).then(|| self.older.front().cloned()).flatten()
    }

    /// Version `made` is the default now; `deleted` (from
    /// [`Self::to_make_room`]) went before it.
    fn made(&mut self, deleted: Option<&String>, made: String) {
        if deleted.is_some() && self.older.front() == deleted {
            self.older.pop_front();
        }
        self.older.push_back(made);
    }
}

/// Where a role's revocation went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// Its set lists it: every session denied from then on.
    At(SystemTime),
    /// Its set is full: revoke it with its own deny instead.
    Full,
    /// The write failed (IAM's answer): retry, or revoke it on its own.
    Failed(String),
}

/// Whose sets: the account and path they live in, the cluster and issuer
/// they are named after.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// The AWS partition (`aws`, `aws-us-gov`, ...).
    pub partition: &'a str,
    /// The account id.
    pub account: &'a str,
    /// The role path root (the sets' IAM path too).
    pub path: &'a str,
    /// The cluster's name.
    pub cluster: &'a str,
    /// The cluster's issuer (host and path).
    pub issuer: &'a str,
}

impl RevocationSets {
    /// `count` sets of the cluster (named from its name and issuer), under
    /// its path: each made if missing, read if there (and rewritten when
    /// another version of ephemera wrote it).
    ///
    /// # Errors
    /// When IAM refuses to make or read them.
    pub async fn load(
        provider: AwsProvider,
        scope: &Scope<'_>,
        count: usize,
        fence: Option<Arc<crate::controller::Fence>>,
    ) -> Result<Arc<Self>> {
        let Scope { partition, account, path, cluster, issuer } = *scope;
        let digest = naming::hex_digest(&format!("{cluster}/{issuer}"), 10);
        let names: Vec<String> = (0..count).map(|i| format!("ephemera-revoked-{digest}-{i}")).collect();
        let arns: Vec<String> =
            names.iter().map(|n| format!("arn:{partition}:iam::{account}:policy{path}{n}")).collect();
        let roles = format!("arn:{partition}:iam::{account}:role{path}*");
        let mut sets = Vec::with_capacity(count);
        let mut stale = Vec::new();
        for (i, (name, arn)) in names.iter().zip(&arns).enumerate() {
            let set = if let Some((found, older)) = provider.policy_versions(arn).await? {
                let keys = keys_in(&found);
                // Written by another version of ephemera (other statements,
                // another root): rewritten with what it lists.
                if found != document(&keys, &roles) {
                    stale.push(i);
                }
                Set { keys, older: older.into(), ..Set::default() }
            } else {
                provider.create_policy(name, path, &document(&BTreeSet::new(), &roles)).await?;
                Set::default()
            };
            tracing::debug!(set = arn, listed = set.keys.len(), "revocation set ready");
            sets.push(Mutex::new(set));
        }
        let this = Arc::new(Self { provider, names, arns, path: path.to_owned(), roles, fence, sets });
        for i in stale {
            let (keys, oldest) = {
                let set = this.sets[i].lock().await;
                (set.keys.clone(), set.to_make_room())
            };
            let version = this.write_version(i, &keys, oldest.as_deref()).await?;
            this.sets[i].lock().await.made(oldest.as_ref(), version);
            tracing::info!(set = this.arns[i], "revocation set rewritten with this version's statements");
        }
        Ok(this)
    }

    /// The set (its ARN, the role's permissions boundary) of a key.
    #[must_use]
    pub fn arn_for(&self, key: &str) -> &str {
        &self.arns[self.index(key)]
    }

    /// Every set's ARN.
    #[must_use]
    pub fn arns(&self) -> &[String] {
        &self.arns
    }

    /// Whether `arn` is one of these sets.
    #[must_use]
    pub fn is_set(&self, arn: &str) -> bool {
        self.arns.iter().any(|a| a == arn)
    }

    /// The sets' IAM path (the role path root).
    #[must_use]
    pub fn path(&self) -> &str {
        &self.path
    }

    fn index(&self, key: &str) -> usize {
        let n = u64::from_str_radix(&key[..key.len().min(8)], 16).unwrap_or(0);
        usize::try_from(n).unwrap_or(0) % self.arns.len().max(1)
    }

    /// Revokes the role of `key`: listed in its set by the next write (one
    /// write for every revocation waiting then), or [`Revoked::Full`] or
    /// [`Revoked::Failed`]. The write runs on a task of its own, so a caller
    /// that gives up never leaves the set unwritten.
    pub async fn revoke(self: &Arc<Self>, key: &str) -> Revoked {
        let i = self.index(key);
        let (tx, rx) = oneshot::channel();
        {
            let mut set = self.sets[i].lock().await;
            if set.keys.contains(key) {
                return Revoked::At(SystemTime::now());
            }
            set.waiting.push((key.to_owned(), tx));
            if !set.writing {
                set.writing = true;
                tokio::spawn(self.clone().write(i));
            }
        }
        rx.await.unwrap_or_else(|_| Revoked::Failed("the revocation set's writer went away".into()))
    }

    /// Whether the role of `key` is listed now.
    pub async fn lists(&self, key: &str) -> bool {
        self.sets[self.index(key)].lock().await.keys.contains(key)
    }

    /// What each set lists now: taken before the roles that still exist are
    /// found, for [`Self::prune`].
    pub async fn listed(&self) -> Vec<BTreeSet<String>> {
        let mut listed = Vec::with_capacity(self.sets.len());
        for set in &self.sets {
            listed.push(set.lock().await.keys.clone());
        }
        listed
    }

    /// Drops at each set's next write the keys of `listed` (an earlier
    /// [`Self::listed`]) that `keep` does not name: keys of roles deleted
    /// while no process of this cluster was there to [`Self::forget`] them
    /// (a restart, a crash), which would otherwise fill the sets for good.
    /// Keys listed since `listed` are kept. How many go.
    pub async fn prune(&self, listed: &[BTreeSet<String>], keep: &std::collections::HashSet<String>) -> usize {
        let mut dropped = 0;
        for (set, listed) in self.sets.iter().zip(listed) {
            let mut set = set.lock().await;
            let stale: Vec<String> =
                listed.iter().filter(|k| !keep.contains(*k) && set.keys.contains(*k)).cloned().collect();
            dropped += stale.len();
            set.gone.extend(stale);
        }
        dropped
    }

    /// The role of `key` is deleted: its key may go at the next write.
    pub async fn forget(&self, key: &str) {
        let mut set = self.sets[self.index(key)].lock().await;
        if set.keys.contains(key) {
            set.gone.insert(key.to_owned());
        }
    }

    /// Writes set `i` until nothing waits: each round lists every key that
    /// waited when it began.
    async fn write(self: Arc<Self>, i: usize) {
        loop {
            let (waiting, keys, oldest) = {
                let mut set = self.sets[i].lock().await;
                if set.waiting.is_empty() {
                    set.writing = false;
                    return;
                }
                let waiting = std::mem::take(&mut set.waiting);
                let gone = std::mem::take(&mut set.gone);
                let mut keys: BTreeSet<String> = set.keys.difference(&gone).cloned().collect();
                let mut full = Vec::new();
                let mut admitted = Vec::new();
                for (key, tx) in waiting {
                    if keys.len() >= CAPACITY {
                        full.push(tx);
                    } else {
                        keys.insert(key);
                        admitted.push(tx);
                    }
                }
                if !full.is_empty() && !set.full {
                    tracing::warn!(
                        set = self.arns[i],
                        listed = keys.len(),
                        beyond = full.len(),
                        "revocation set full: roles beyond it are revoked one by one until it has room (more --revocation-sets hold bigger bursts)"
                    );
                }
                set.full = !full.is_empty();
                for tx in full {
                    let _ = tx.send(Revoked::Full);
                }
                (admitted, keys, set.to_make_room())
            };
            let result = self.write_version(i, &keys, oldest.as_deref()).await;
            let mut set = self.sets[i].lock().await;
            match result {
                Ok(version) => {
                    set.made(oldest.as_ref(), version);
                    set.keys = keys;
                    // Room for the next writes, made while nothing waits:
                    // a revocation then costs one write, not two.
                    if set.older.len() > SPARE && !set.trimming {
                        set.trimming = true;
                        tokio::spawn(self.clone().trim(i));
                    }
                    let at = SystemTime::now();
                    for tx in waiting {
                        let _ = tx.send(Revoked::At(at));
                    }
                }
                Err(e) => {
                    tracing::warn!(set = self.arns[i], error = %e, "writing a revocation set failed");
                    for tx in waiting {
                        let _ = tx.send(Revoked::Failed(e.to_string()));
                    }
                }
            }
        }
    }

    /// Deletes set `i`'s oldest versions until [`SPARE`] are left, just
    /// after revocations in urgency (before deletions and provisioning).
    async fn trim(self: Arc<Self>, i: usize) {
        loop {
            let oldest = {
                let mut set = self.sets[i].lock().await;
                if set.older.len() <= SPARE {
                    set.trimming = false;
                    return;
                }
                set.deleting += 1;
                set.older.pop_front()
            };
            let Some(oldest) = oldest else { continue };
            let deleted = self.provider.delete_policy_version(Urgency::Ready, &self.arns[i], &oldest).await;
            let mut set = self.sets[i].lock().await;
            set.deleting -= 1;
            if let Err(e) = deleted {
                tracing::debug!(set = self.arns[i], error = %e, "deleting an old version failed; the next write makes room");
                set.older.push_front(oldest);
                set.trimming = false;
                return;
            }
        }
    }

    async fn write_version(&self, i: usize, keys: &BTreeSet<String>, oldest: Option<&str>) -> Result<String> {
        if let Some(fence) = &self.fence {
            fence.check().await?;
        }
        if let Some(old) = oldest {
            self.provider.delete_policy_version(Urgency::Revoke, &self.arns[i], old).await?;
        }
        match self.provider.set_policy_document(&self.arns[i], &document(keys, &self.roles)).await {
            Err(Error::Cloud { message, .. }) if message.starts_with("LimitExceeded") => {
                // Versions this process did not know of (another writer, a
                // crash): start again from what IAM says.
                if let Some((_, older)) = self.provider.policy_versions(&self.arns[i]).await?
                    && let Some(old) = older.first()
                {
                    self.provider.delete_policy_version(Urgency::Revoke, &self.arns[i], old).await?;
                    let mut set = self.sets[i].lock().await;
                    set.older = older.into_iter().skip(1).collect();
                }
                self.provider.set_policy_document(&self.arns[i], &document(keys, &self.roles)).await
            }
            other => other,
        }
    }

    /// The sets' names (for logs and the operator's IAM policy).
    #[must_use]
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: &str = "arn:aws-us-gov:iam::111122223333:role/ephemera/*";
    const SCOPE: Scope<'static> = Scope {
        partition: "aws",
        account: "111122223333",
        path: "/ephemera/",
        cluster: "c",
        issuer: "oidc.example/id/1",
    };

    #[test]
    fn a_sets_document_lists_its_keys_and_reads_back() {
        let empty = document(&BTreeSet::new(), ROLES);
        assert_eq!(
            empty["Statement"][1]["Condition"]["StringEquals"]["aws:PrincipalTag/ephemera.dev/revocation"],
            json!(["none"])
        );
        assert!(keys_in(&empty).is_empty());
        let keys: BTreeSet<String> = ["a1", "b2"].iter().map(|k| (*k).to_owned()).collect();
        let doc = document(&keys, ROLES);
        assert_eq!(doc["Statement"][0]["Effect"], "Allow", "a boundary that limits nothing else");
        assert_eq!(doc["Statement"][1]["Effect"], "Deny");
        assert_eq!(keys_in(&doc), keys);
    }

    #[test]
    fn a_set_denies_its_roles_what_would_undo_it() {
        let doc = document(&BTreeSet::new(), ROLES);
        let statements = doc["Statement"].as_array().unwrap();
        let denied = |action: &str| {
            statements.iter().find(|s| {
                s["Effect"] == "Deny" && s["Action"].as_array().is_some_and(|a| a.iter().any(|x| x == action))
            })
        };
        for action in ["iam:DeleteRolePermissionsBoundary", "iam:PutRolePermissionsBoundary"] {
            let s = denied(action).unwrap_or_else(|| panic!("{action} is not denied"));
            assert_eq!(s["Resource"], ROLES);
            assert!(s.get("Condition").is_none(), "{action}: always");
        }
        for action in ["iam:TagRole", "iam:UntagRole"] {
            let s = denied(action).unwrap_or_else(|| panic!("{action} is not denied"));
            assert_eq!(s["Resource"], ROLES);
            assert_eq!(s["Condition"]["ForAnyValue:StringLike"]["aws:TagKeys"], "ephemera.dev/*");
        }
    }

    #[test]
    fn a_full_set_fits_iams_limit_on_a_managed_policy() {
        let keys: BTreeSet<String> = (0..CAPACITY).map(|i| key_of(&format!("uid-{i}"))).collect();
        assert_eq!(keys.len(), CAPACITY, "keys do not collide");
        let text = document(&keys, ROLES).to_string();
        let without_whitespace = text.chars().filter(|c| !c.is_whitespace()).count();
        assert!(without_whitespace <= 6144, "{without_whitespace} characters");
    }

    async fn one_set(iam: &crate::test_support::fake_iam::FakeIam) -> Arc<RevocationSets> {
        RevocationSets::load(iam.provider().await, &SCOPE, 1, None).await.unwrap()
    }

    #[tokio::test]
    async fn revocations_that_wait_together_share_one_write() {
        let iam = crate::test_support::fake_iam::FakeIam::start().await;
        let sets = one_set(&iam).await;
        let arn = sets.arn_for("anything").to_owned();
        assert_eq!(
            iam.calls(),
            ["ListPolicyVersions", "CreatePolicy:ephemera-revoked-4b1f764b24-0"],
            "made when missing"
        );
        let keys: Vec<String> = (0..20).map(|i| key_of(&format!("uid-{i}"))).collect();
        let answers = futures::future::join_all(keys.iter().map(|k| sets.revoke(k))).await;
        assert!(answers.iter().all(|a| matches!(a, Revoked::At(_))), "{answers:?}");
        let writes = iam.calls().iter().filter(|c| *c == "CreatePolicyVersion").count();
        assert!((1..=2).contains(&writes), "20 revocations took {writes} writes");
        let listed = keys_in(&iam.policy_document(&arn).unwrap());
        assert!(keys.iter().all(|k| listed.contains(k)), "every key listed");
        // Listed already: no write.
        let before = iam.calls().len();
        assert!(matches!(sets.revoke(&keys[0]).await, Revoked::At(_)));
        assert_eq!(iam.calls().len(), before);

        // A new process reads what the sets list.
        let again = one_set(&iam).await;
        assert!(again.lists(&keys[3]).await);
        assert_eq!(iam.calls().len(), before + 2, "and writes nothing: {:?}", iam.calls());

        // A set another version wrote (other statements) is rewritten at
        // start with what it lists.
        let mut old =
            document(&keys_in(&iam.policy_document(&arn).unwrap()), "arn:aws:iam::111122223333:role/ephemera/*");
        old["Statement"].as_array_mut().unwrap().truncate(2);
        sets.provider.set_policy_document(&arn, &old).await.unwrap();
        let upgraded = one_set(&iam).await;
        let now = iam.policy_document(&arn).unwrap();
        assert_eq!(now["Statement"].as_array().unwrap().len(), 4, "{now}");
        assert_eq!(keys_in(&now), keys.iter().cloned().collect::<BTreeSet<_>>(), "keeping every key");
        assert!(upgraded.lists(&keys[7]).await);
    }

    #[tokio::test]
    async fn a_set_keeps_within_iams_five_versions_and_drops_deleted_roles_keys() {
        let iam = crate::test_support::fake_iam::FakeIam::start().await;
        let sets = one_set(&iam).await;
        let arn = sets.arn_for("anything").to_owned();
        for i in 0..8 {
            let key = key_of(&format!("uid-{i}"));
            assert!(matches!(sets.revoke(&key).await, Revoked::At(_)));
            assert!(iam.policy_versions(&arn) <= MAX_VERSIONS);
            if i == 2 {
                sets.forget(&key).await;
            }
        }
        assert!(iam.calls().iter().any(|c| c == "DeletePolicyVersion"), "{:?}", iam.calls());
        let listed = keys_in(&iam.policy_document(&arn).unwrap());
        assert!(!listed.contains(&key_of("uid-2")), "a deleted role's key went at the next write");
        assert!(listed.contains(&key_of("uid-7")) && listed.contains(&key_of("uid-1")));
    }

    #[tokio::test]
    async fn keys_of_roles_that_no_longer_exist_go_at_the_next_write_and_no_others() {
        let iam = crate::test_support::fake_iam::FakeIam::start().await;
        let sets = one_set(&iam).await;
        let arn = sets.arn_for("anything").to_owned();
        let key = |i: usize| key_of(&format!("uid-{i}"));
        for i in 0..3 {
            assert!(matches!(sets.revoke(&key(i)).await, Revoked::At(_)));
        }
        // A new process (the roles of uid-0 and uid-1 were deleted meanwhile).
        let sets = one_set(&iam).await;
        let listed = sets.listed().await;
        // Listed after the snapshot: never a candidate.
        assert!(matches!(sets.revoke(&key(3)).await, Revoked::At(_)));
        let keep: std::collections::HashSet<String> = [key(2)].into();
        assert_eq!(sets.prune(&listed, &keep).await, 2);
        assert!(matches!(sets.revoke(&key(4)).await, Revoked::At(_)));
        let now = keys_in(&iam.policy_document(&arn).unwrap());
        assert_eq!(now, [key(2), key(3), key(4)].into_iter().collect::<BTreeSet<_>>());
    }

    #[test]
    fn keys_come_from_the_lease_uid_and_are_never_those_of_another() {
        assert_eq!(key_of("u1"), key_of("u1"));
        assert_ne!(key_of("u1"), key_of("u2"));
        assert_eq!(key_of("u1").len(), 12);
        assert_ne!(key_of("u1"), NONE);
    }
}
