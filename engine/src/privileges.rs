//! Dropping root: after every listener, the stats socket and the log file are open, switch to
//! `global.user` / `global.group` for good (supplementary groups cleared, real, effective and saved
//! ids all changed), so a compromise of the data path does not run as root.
//!
//! glibc applies setuid/setgid to every thread of the process; we call it before the workers start
//! anyway, so nothing ever runs as root that does not need to.

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

/// Switches to `ids` for good. A process that already runs as them is left alone; a non-root
/// process that would need to change ids gets an error saying so.
pub fn drop_to(ids: Ids) -> Result<(), PrivilegeError> {
    let (uid, gid) = sys::ids();
    if uid == ids.uid && gid == ids.gid {
        return Ok(());
    }
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
