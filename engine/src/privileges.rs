//! Dropping root: after every listener, the stats socket and the log file are open, switch to
//! `global.user` / `global.group` for good (supplementary groups cleared, real, effective and saved
//! ids all changed), so a compromise of the data path does not run as root.
//!
//! glibc applies setuid/setgid to every thread of the process; we call it before the workers start
//! anyway, so nothing ever runs as root that does not need to.

use std::ffi::CString;

/// A user and group resolved to ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Resolves `user` (and `group`, default: the user's primary group).
pub fn resolve(user: &str, group: Option<&str>) -> Result<Ids, String> {
    let (uid, primary) = lookup_user(user)?;
    let gid = match group {
        Some(g) => lookup_group(g)?,
        None => primary,
    };
    Ok(Ids { uid, gid })
}

fn lookup_user(name: &str) -> Result<(libc::uid_t, libc::gid_t), String> {
    let c = CString::new(name).map_err(|_| format!("user \"{name}\" contains a NUL byte"))?;
    // SAFETY: passwd is plain data; getpwnam_r writes into `pwd` and `buf`, which outlive the call.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return Err(format!("user \"{name}\" does not exist on this host"));
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

fn lookup_group(name: &str) -> Result<libc::gid_t, String> {
    let c = CString::new(name).map_err(|_| format!("group \"{name}\" contains a NUL byte"))?;
    // SAFETY: as above, with group/getgrnam_r.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    let r = unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return Err(format!("group \"{name}\" does not exist on this host"));
    }
    Ok(grp.gr_gid)
}

/// Switches to `ids` for good. A process that already runs as them is left alone; a non-root
/// process that would need to change ids gets an error saying so.
pub fn drop_to(ids: Ids) -> Result<(), String> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if uid == ids.uid && gid == ids.gid {
        return Ok(());
    }
    if uid != 0 {
        return Err(format!("cannot switch to uid {} gid {}: not running as root (uid {uid})", ids.uid, ids.gid));
    }
    // SAFETY: plain syscalls with value arguments; order matters: groups and gid before uid.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(format!("setgroups: {}", std::io::Error::last_os_error()));
        }
        if libc::setresgid(ids.gid, ids.gid, ids.gid) != 0 {
            return Err(format!("setresgid({}): {}", ids.gid, std::io::Error::last_os_error()));
        }
        if libc::setresuid(ids.uid, ids.uid, ids.uid) != 0 {
            return Err(format!("setresuid({}): {}", ids.uid, std::io::Error::last_os_error()));
        }
        // Root must be gone for good.
        if ids.uid != 0 && libc::setuid(0) == 0 {
            return Err("still able to become root after dropping privileges".into());
        }
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
        assert!(resolve("no-such-user-ringproxy", None).unwrap_err().contains("does not exist"));
        assert!(resolve("root", Some("no-such-group-ringproxy")).unwrap_err().contains("does not exist"));
    }
}
