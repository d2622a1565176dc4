//! Least privilege: what the process may do once every listener is bound.
//!
//! Two steps. [`restrict`], before any thread starts (the binary calls it first), sets what every
//! thread inherits and nothing ever needs: no_new_privs (execve can grant nothing), an empty
//! ambient and inheritable set, and, when the process may (root), an empty bounding set. Then,
//! once the engine has bound, [`drop_after_binding`]: started as root with `global.user`, switch to
//! that user and group for good (supplementary groups cleared, real, effective and saved ids all
//! changed, root checked to be gone); started as any other user, drop every capability it was
//! given (ambient, file or inherited ones), whether `user` is set or not. The data path needs none:
//! rings, sockets toward servers, pipes and the log work unprivileged. A process started as root
//! without `user` (or with `user: root`) stays root; that is the operator's choice.
//!
//! Capabilities are per thread and a thread starts with its creator's: the engine drops them
//! before it starts any thread of its own. The few threads started before (the stats endpoints,
//! started as root so the socket can be given to `user`) lose theirs with the switch of ids, which
//! glibc applies to every thread and the kernel answers by clearing their capabilities.

use std::ffi::CString;

use crate::sys;

/// A user and group resolved to ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Why an account could not be resolved or switched to.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `what` is "user" or "group".
    #[error("{what} \"{name}\" contains a NUL byte")]
    NulByte { what: &'static str, name: String },
    #[error("{what} \"{name}\" does not exist on this host")]
    Unknown { what: &'static str, name: String },
    #[error("cannot switch to uid {} gid {}: not running as root (uid {uid})", .to.uid, .to.gid)]
    NotRoot { to: Ids, uid: libc::uid_t },
    /// A set*id call failed; `call` names it as the message shows it (`setresuid(65534)`).
    #[error("{call}: {source}")]
    Switch { call: String, source: std::io::Error },
    #[error("still able to become root after dropping privileges")]
    RootRegained,
    /// A prctl, capget or capset call failed; `call` names it.
    #[error("{call}: {source}")]
    Restrict { call: &'static str, source: std::io::Error },
    #[error("capabilities {0:#x} remain after dropping them all")]
    CapsRemain(u64),
}

/// Resolves `user` (and `group`, default: the user's primary group).
pub fn resolve(user: &str, group: Option<&str>) -> Result<Ids, PrivilegeError> {
    let (uid, primary) = sys::lookup_user(&c_name("user", user)?).ok_or_else(|| unknown("user", user))?;
    let gid = match group {
        Some(g) => sys::lookup_group(&c_name("group", g)?).ok_or_else(|| unknown("group", g))?,
        None => primary,
    };
    Ok(Ids { uid, gid })
}

fn c_name(what: &'static str, name: &str) -> Result<CString, PrivilegeError> {
    CString::new(name).map_err(|_| PrivilegeError::NulByte { what, name: name.to_owned() })
}

fn unknown(what: &'static str, name: &str) -> PrivilegeError {
    PrivilegeError::Unknown { what, name: name.to_owned() }
}

/// CAP_SETPCAP: needed to change the bounding set.
const CAP_SETPCAP: u64 = 1 << 8;

/// Before any thread starts: sets no_new_privs and empties the ambient and inheritable sets (and
/// the bounding set, when this process holds CAP_SETPCAP). Nothing of what the engine does needs
/// them; every thread started afterwards inherits them. The effective and permitted sets are
/// untouched: binding may still need them.
pub fn restrict() -> Result<(), PrivilegeError> {
    let failed = |call: &'static str| move |source| PrivilegeError::Restrict { call, source };
    sys::set_no_new_privs().map_err(failed("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    sys::clear_ambient_caps().map_err(failed("prctl(PR_CAP_AMBIENT_CLEAR_ALL)"))?;
    let caps = sys::caps().map_err(failed("capget"))?;
    if caps.effective & CAP_SETPCAP != 0 {
        sys::clear_bounding_caps().map_err(failed("prctl(PR_CAPBSET_DROP)"))?;
    }
    sys::set_caps(sys::CapSets { inheritable: 0, ..caps }).map_err(failed("capset"))
}

/// After binding, on the thread that goes on to start the engine's threads: switches to `ids`
/// when running as root, and drops every capability unless the process stays root (no `user`, or
/// `user: root`). A non-root process that would need to change ids gets an error saying so.
/// Calling it again (a reload) changes nothing.
pub fn drop_after_binding(ids: Option<Ids>) -> Result<(), PrivilegeError> {
    let (uid, gid) = sys::ids();
    if let Some(ids) = ids
        && (uid, gid) != (ids.uid, ids.gid)
    {
        switch(uid, ids)?;
    }
    if sys::ids().0 == 0 {
        return Ok(()); // root stays root
    }
    sys::clear_ambient_caps()
        .map_err(|source| PrivilegeError::Restrict { call: "prctl(PR_CAP_AMBIENT_CLEAR_ALL)", source })?;
    sys::set_caps(sys::CapSets::default()).map_err(|source| PrivilegeError::Restrict { call: "capset", source })?;
    match sys::caps() {
        Ok(left) if left == sys::CapSets::default() => Ok(()),
        Ok(left) => Err(PrivilegeError::CapsRemain(left.permitted | left.effective | left.inheritable)),
        Err(source) => Err(PrivilegeError::Restrict { call: "capget", source }),
    }
}

/// Switches a root process to `ids` for good.
fn switch(uid: libc::uid_t, ids: Ids) -> Result<(), PrivilegeError> {
    if uid != 0 {
        return Err(PrivilegeError::NotRoot { to: ids, uid });
    }
    let failed = |call: String| move |source| PrivilegeError::Switch { call, source };
    // Order matters: groups and gid while still root, the uid last.
    sys::clear_groups().map_err(failed("setgroups".into()))?;
    sys::set_gid(ids.gid).map_err(failed(format!("setresgid({})", ids.gid)))?;
    sys::set_uid(ids.uid).map_err(failed(format!("setresuid({})", ids.uid)))?;
    // Root must be gone for good.
    if ids.uid != 0 && sys::set_uid(0).is_ok() {
        return Err(PrivilegeError::RootRegained);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_existing_and_refuses_unknown_accounts() {
        let root = resolve("root", None).unwrap();
        assert_eq!(root, Ids { uid: 0, gid: 0 });
        let e = resolve("no-such-user-ringproxy", None).unwrap_err().to_string();
        assert_eq!(e, "user \"no-such-user-ringproxy\" does not exist on this host");
        let e = resolve("root", Some("no-such-group-ringproxy")).unwrap_err().to_string();
        assert_eq!(e, "group \"no-such-group-ringproxy\" does not exist on this host");
        assert_eq!(resolve("ro\0ot", None).unwrap_err().to_string(), "user \"ro\0ot\" contains a NUL byte");
    }
}
