//! The files a ledger lives in: who may read and replace them. quotaguard's own files
//! are `0600` in `0700` directories; what it owns and finds looser it tightens, what it
//! cannot tighten it warns about, and a directory another user controls it refuses.
use std::fs;
use std::path::Path;

/// A directory's fitness to hold a ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirVerdict {
    Fine,
    /// Usable, but others could replace or delete what is in it.
    Warn(String),
    /// Another user (not root) controls it: they could swap the ledger for one of theirs.
    Refuse(String),
}

/// The effective user id of this process (`None` off Unix).
pub fn euid() -> Option<u32> {
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions and cannot fail.
        Some(unsafe { libc::geteuid() })
    }
    #[cfg(not(unix))]
    {
        None
    }
}

fn shown(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Judges the directory `dir` (its owner `uid`, its permission bits `mode`) for a
/// process running as `me`: a pure function of the numbers, so that every case is
/// tested without changing owners.
pub fn judge_dir(dir: &Path, uid: u32, mode: u32, me: u32) -> DirVerdict {
    if uid != me && uid != 0 {
        return DirVerdict::Refuse(format!(
            "directory {} belongs to another user (uid {uid}), who could replace the ledger: \
             keep the ledger in a directory of your own",
            shown(dir)
        ));
    }
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 {
            "every user"
        } else {
            "its group"
        };
        return DirVerdict::Warn(format!(
            "directory {} is writable by {who} (mode {:04o}), who could replace or delete the \
             ledger: chmod go-w it, or keep the ledger in a private directory",
            shown(dir),
            mode & 0o7777
        ));
    }
    DirVerdict::Fine
}

/// Looks at the directory a ledger file is in.
pub fn check_dir(dir: &Path) -> std::io::Result<DirVerdict> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(dir)?;
        Ok(match euid() {
            Some(me) => judge_dir(dir, m.uid(), m.mode(), me),
            None => DirVerdict::Fine,
        })
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(DirVerdict::Fine)
    }
}

/// Tightens `dir` to `0700` when this process owns it and it is looser: the directory
/// quotaguard made for itself (`~/.quotaguard`). Returns a warning when it cannot.
pub fn tighten_dir(dir: &Path) -> Option<String> {
    tighten(dir, 0o700)
}

/// Tightens a file of the ledger (the database, its `-wal` and `-shm`) to `0600` when
/// this process owns it; a file it does not own and others may read or write is
/// warned about. A missing file is fine.
pub fn tighten_file(path: &Path) -> Option<String> {
    tighten(path, 0o600)
}

fn tighten(path: &Path, want: u32) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = fs::symlink_metadata(path).ok()?;
        if m.file_type().is_symlink() {
            return None;
        }
        let loose = m.mode() & 0o077;
        if loose == 0 {
            return None;
        }
        let mode = m.mode() & 0o7777;
        if Some(m.uid()) == euid() {
            return match fs::set_permissions(path, fs::Permissions::from_mode(want)) {
                Ok(()) => None,
                Err(e) => Some(format!(
                    "{} is open to other users (mode {mode:04o}) and could not be tightened \
                     to {want:04o}: {e}",
                    shown(path)
                )),
            };
        }
        Some(format!(
            "{} belongs to uid {} and is open to other users (mode {mode:04o}): ask its owner \
             to chmod {want:o} it",
            shown(path),
            m.uid()
        ))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, want);
        None
    }
}

/// What is loose about a ledger file right now (for a check): a line per problem.
pub fn loose_file(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(path).ok()?;
        let mode = m.mode() & 0o7777;
        (m.file_type().is_file() && mode & 0o077 != 0).then(|| {
            format!(
                "{} is open to other users (mode {mode:04o}): chmod 600 it",
                shown(path)
            )
        })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Creates `dir` (and its parents) readable by its owner only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_judged_by_owner_and_mode() {
        let d = Path::new("/x/y");
        assert_eq!(judge_dir(d, 1000, 0o40700, 1000), DirVerdict::Fine);
        assert_eq!(judge_dir(d, 1000, 0o40755, 1000), DirVerdict::Fine);
        // Root's directories are trusted (root could do anything anyway).
        assert_eq!(judge_dir(d, 0, 0o40755, 1000), DirVerdict::Fine);
        for mode in [0o40775, 0o40777, 0o41777, 0o40722] {
            match judge_dir(d, 1000, mode, 1000) {
                DirVerdict::Warn(w) => {
                    assert!(w.contains("\"/x/y\"") && w.contains("chmod go-w"), "{w}")
                }
                v => panic!("{mode:o}: {v:?}"),
            }
        }
        assert!(matches!(
            judge_dir(d, 0, 0o41777, 1000),
            DirVerdict::Warn(_)
        ));
        // Another user's directory, however tight, is refused; root included.
        for me in [1000, 0] {
            match judge_dir(d, 1001, 0o40700, me) {
                DirVerdict::Refuse(r) => assert!(r.contains("uid 1001"), "{r}"),
                v => panic!("{v:?}"),
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn own_files_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("l.db");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(loose_file(&f).unwrap().contains("0666"));
        assert_eq!(tighten_file(&f), None);
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(loose_file(&f), None);
        assert_eq!(tighten_file(&dir.path().join("missing")), None);
        let sub = dir.path().join("d");
        create_private_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(tighten_dir(&sub), None);
        assert_eq!(
            fs::metadata(&sub).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
