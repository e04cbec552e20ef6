//! Unpacking `.tar.gz`/`.tgz`/`.tar`/`.zip` safely: every entry must land inside
//! the staging directory. Absolute paths, `..`, links that point out (or through
//! other links), device files and archives past the size or entry bounds are
//! refused with the entry's name. The format is read from the bytes, not the URL.

use super::FetchError;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Bounds on what an archive may hold.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest archive accepted.
    pub max_download_bytes: u64,
    /// Largest total of unpacked file sizes.
    pub max_unpacked_bytes: u64,
    /// Most entries.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_download_bytes: 8 << 30,
            max_unpacked_bytes: 32 << 30,
            // an inode per entry: a job's store has thousands, not millions
            max_entries: 100_000,
        }
    }
}

/// What was unpacked.
#[derive(Debug, Default)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

enum Format {
    TarGz,
    Tar,
    Zip,
}

fn sniff(file: &mut File) -> Result<Format, FetchError> {
    let mut head = [0u8; 512];
    let n = read_up_to(file, &mut head).map_err(FetchError::io("reading the archive"))?;
    file.rewind()
        .map_err(FetchError::io("reading the archive"))?;
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Format::TarGz)
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Ok(Format::Zip)
    } else if n >= 262 && &head[257..262] == b"ustar" {
        Ok(Format::Tar)
    } else {
        Err(FetchError::Archive(
            "not a .tar.gz, .tgz, .tar or .zip archive".into(),
        ))
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Unpacks `archive` into the empty directory `root`.
pub fn unpack(archive: &Path, root: &Path, limits: &Limits) -> Result<Stats, FetchError> {
    let mut file = File::open(archive).map_err(FetchError::io("opening the archive"))?;
    let mut sink = Sink {
        root,
        limits,
        stats: Stats::default(),
        links: Vec::new(),
    };
    match sniff(&mut file)? {
        Format::TarGz => sink.tar(tar::Archive::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::new(file),
        )))?,
        Format::Tar => sink.tar(tar::Archive::new(io::BufReader::new(file)))?,
        Format::Zip => sink.zip(file)?,
    }
    sink.create_symlinks()?;
    Ok(sink.stats)
}

/// A symbolic link waiting until every other entry is in place.
struct PendingLink {
    entry: String,
    path: PathBuf,
    target: PathBuf,
}

struct Sink<'a> {
    root: &'a Path,
    limits: &'a Limits,
    stats: Stats,
    links: Vec<PendingLink>,
}

impl Sink<'_> {
    fn tar<R: Read>(&mut self, mut archive: tar::Archive<R>) -> Result<(), FetchError> {
        let corrupt =
            |e: io::Error| FetchError::Archive(format!("corrupt or truncated tar stream: {e}"));
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions()
                || kind.is_pax_local_extensions()
                || kind.is_gnu_longname()
                || kind.is_gnu_longlink()
            {
                continue;
            }
            self.count(&name)?;
            if kind.is_dir() && names_the_root(&name) {
                continue; // `.` or `./`, as `tar -C dir -czf job.tgz .` and shutil write first
            }
            let rel = safe_relative(&name)?;
            let dest = self.root.join(&rel);
            if kind.is_dir() {
                fs::create_dir_all(&dest).map_err(FetchError::io(format!("creating {name}")))?;
            } else if kind.is_file() || kind.is_contiguous() {
                let mode = entry.header().mode().unwrap_or(0o644);
                self.write_file(&name, &dest, &mut entry, mode)
                    .map_err(|e| match e {
                        FetchError::Io { source, .. }
                            if source.kind() == io::ErrorKind::UnexpectedEof
                                || source.kind() == io::ErrorKind::InvalidInput =>
                        {
                            FetchError::Archive(format!(
                                "corrupt or truncated entry {name:?}: {source}"
                            ))
                        }
                        other => other,
                    })?;
            } else if kind.is_symlink() {
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| unsafe_entry(&name, "symbolic link without a target"))?
                    .into_owned();
                self.links.push(PendingLink {
                    entry: name,
                    path: rel,
                    target,
                });
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| unsafe_entry(&name, "hard link without a target"))?;
                let target_rel = safe_relative(&target.to_string_lossy()).map_err(|_| {
                    unsafe_entry(
                        &name,
                        &format!(
                            "hard link to {} points outside the destination",
                            target.display()
                        ),
                    )
                })?;
                let source = self.root.join(&target_rel);
                if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                    return Err(unsafe_entry(
                        &name,
                        "hard link to something that is not an earlier regular file of the archive",
                    ));
                }
                make_parent(&dest, &name)?;
                fs::hard_link(&source, &dest).map_err(FetchError::io(format!("linking {name}")))?;
            } else {
                return Err(unsafe_entry(&name, "device, FIFO or other special file"));
            }
        }
        Ok(())
    }

    fn zip(&mut self, file: File) -> Result<(), FetchError> {
        let corrupt = |e: zip::result::ZipError| FetchError::Archive(format!("corrupt zip: {e}"));
        let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(corrupt)?;
        if archive.len() as u64 > self.limits.max_entries {
            return Err(FetchError::TooLarge(format!(
                "{} entries, over the limit of {}",
                archive.len(),
                self.limits.max_entries
            )));
        }
        for i in 0..archive.len() {
            let mut entry = archive.by_index(i).map_err(corrupt)?;
            let name = entry.name().map_err(corrupt)?.into_owned();
            self.count(&name)?;
            if entry.is_dir() && names_the_root(&name) {
                continue;
            }
            let rel = safe_relative(&name)?;
            let dest = self.root.join(&rel);
            if entry.is_symlink() {
                let mut target = String::new();
                entry
                    .by_ref()
                    .take(4096)
                    .read_to_string(&mut target)
                    .map_err(FetchError::io(format!("reading {name}")))?;
                self.links.push(PendingLink {
                    entry: name,
                    path: rel,
                    target: PathBuf::from(target),
                });
            } else if entry.is_dir() {
                fs::create_dir_all(&dest).map_err(FetchError::io(format!("creating {name}")))?;
            } else {
                let mode = entry.unix_mode().unwrap_or(0o644);
                if mode & 0o170000 != 0 && mode & 0o170000 != 0o100000 {
                    return Err(unsafe_entry(&name, "device, FIFO or other special file"));
                }
                self.write_file(&name, &dest, &mut entry, mode)?;
            }
        }
        Ok(())
    }

    fn count(&mut self, name: &str) -> Result<(), FetchError> {
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(FetchError::TooLarge(format!(
                "more than {} entries (at {name:?})",
                self.limits.max_entries
            )));
        }
        Ok(())
    }

    /// Writes one regular file, counting its real size against the bound
    /// (declared sizes are not trusted).
    fn write_file(
        &mut self,
        name: &str,
        dest: &Path,
        reader: &mut dyn Read,
        mode: u32,
    ) -> Result<(), FetchError> {
        make_parent(dest, name)?;
        let mut out = File::create(dest).map_err(FetchError::io(format!("creating {name}")))?;
        let budget = self.limits.max_unpacked_bytes - self.stats.bytes;
        let written = io::copy(&mut reader.take(budget + 1), &mut out)
            .map_err(FetchError::io(format!("unpacking {name}")))?;
        self.stats.bytes += written;
        if written > budget {
            return Err(FetchError::TooLarge(format!(
                "unpacked content passes the limit of {} bytes (at {name:?})",
                self.limits.max_unpacked_bytes
            )));
        }
        // Readable (and writable) by the pod's group, as OpenShift's
        // arbitrary UIDs share group 0; never setuid or setgid.
        let exec = if mode & 0o111 != 0 { 0o110 } else { 0 };
        fs::set_permissions(dest, fs::Permissions::from_mode(0o660 | exec | 0o004))
            .map_err(FetchError::io(format!("setting the mode of {name}")))?;
        Ok(())
    }

    /// Creates the symbolic links last, once it is known which paths are links:
    /// a link must stay inside the tree and must not lead through another link
    /// (a chain could add up to an escape that no single link shows).
    fn create_symlinks(&mut self) -> Result<(), FetchError> {
        let link_paths: HashSet<PathBuf> = self.links.iter().map(|l| l.path.clone()).collect();
        for link in &self.links {
            let outside = || {
                unsafe_entry(
                    &link.entry,
                    &format!(
                        "symbolic link to {} points outside the destination",
                        link.target.display()
                    ),
                )
            };
            let through = || {
                unsafe_entry(
                    &link.entry,
                    "symbolic link leads through another symbolic link",
                )
            };
            if link
                .path
                .ancestors()
                .skip(1)
                .any(|a| link_paths.contains(a))
            {
                return Err(through());
            }
            match resolve_inside(&link.path, &link.target, &link_paths) {
                Resolved::Inside => {}
                Resolved::Outside => return Err(outside()),
                Resolved::ThroughLink => return Err(through()),
            }
            let dest = self.root.join(&link.path);
            make_parent(&dest, &link.entry)?;
            std::os::unix::fs::symlink(&link.target, &dest)
                .map_err(FetchError::io(format!("creating link {}", link.entry)))?;
        }
        Ok(())
    }
}

fn make_parent(dest: &Path, name: &str) -> Result<(), FetchError> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .map_err(FetchError::io(format!("creating the folder of {name}")))?;
    }
    Ok(())
}

fn unsafe_entry(name: &str, reason: &str) -> FetchError {
    FetchError::Unsafe {
        entry: name.to_owned(),
        reason: reason.to_owned(),
    }
}

/// True for a name that is the root itself (`.`, `./`, `././`): accepted as a
/// directory entry (nothing to create), refused as anything else by
/// [`safe_relative`].
fn names_the_root(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(['\\', '\0'])
        && Path::new(name).components().all(|c| c == Component::CurDir)
}

/// An entry name as a path relative to the root: no absolute paths, no `..`.
fn safe_relative(name: &str) -> Result<PathBuf, FetchError> {
    if name.contains('\0') || name.contains('\\') {
        return Err(unsafe_entry(name, "the name holds a NUL or a backslash"));
    }
    let mut rel = PathBuf::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(unsafe_entry(name, "the path climbs out with '..'"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(name, "absolute path"));
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(unsafe_entry(name, "empty path"));
    }
    Ok(rel)
}

/// Where a link target lands, read lexically from the link's folder.
#[derive(Debug, PartialEq, Eq)]
enum Resolved {
    /// Inside the root.
    Inside,
    /// Absolute, or climbing above the root.
    Outside,
    /// An intermediate step is itself a link, so the lexical reading is not
    /// where the bytes are (`d/l/..` with `d/l -> ..`).
    ThroughLink,
}

fn resolve_inside(link: &Path, target: &Path, links: &HashSet<PathBuf>) -> Resolved {
    let mut at: PathBuf = link.parent().map(Path::to_path_buf).unwrap_or_default();
    let components: Vec<Component<'_>> = target.components().collect();
    for (i, component) in components.iter().enumerate() {
        match component {
            Component::Normal(part) => {
                at.push(part);
                if i + 1 < components.len() && links.contains(&at) {
                    return Resolved::ThroughLink;
                }
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if !at.pop() {
                    return Resolved::Outside;
                }
            }
            Component::RootDir | Component::Prefix(_) => return Resolved::Outside,
        }
    }
    Resolved::Inside
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            safe_relative("./mlruns/0/meta.yaml").unwrap(),
            PathBuf::from("mlruns/0/meta.yaml")
        );
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/../b",
            "",
            ".",
            "a\\b",
        ] {
            assert!(safe_relative(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_root_entry() {
        for root in [".", "./", "./.", "././"] {
            assert!(names_the_root(root), "{root:?}");
            // still never a path to write a file or a link at
            assert!(safe_relative(root).is_err(), "{root:?}");
        }
        for other in ["", "/", "./a", "..", "./..", ".\\"] {
            assert!(!names_the_root(other), "{other:?}");
        }
    }

    #[test]
    fn link_resolution() {
        let links: HashSet<PathBuf> = [PathBuf::from("d/l")].into();
        let r = |l: &str, t: &str| resolve_inside(Path::new(l), Path::new(t), &links);
        assert_eq!(r("a/b/link", "../c"), Resolved::Inside);
        assert_eq!(r("link", "x/y"), Resolved::Inside);
        assert_eq!(r("link", "d/l"), Resolved::Inside);
        assert_eq!(r("a/link", "../.."), Resolved::Outside);
        assert_eq!(r("link", "/etc"), Resolved::Outside);
        assert_eq!(r("link", ".."), Resolved::Outside);
        assert_eq!(r("x", "d/l/.."), Resolved::ThroughLink);
        assert_eq!(r("x", "d/l/y"), Resolved::ThroughLink);
    }
}
