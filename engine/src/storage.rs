//! Where durable things go: an object store at a location (`s3://bucket/prefix`,
//! a local path or `file://...`), with what the exactly-once protocol needs of
//! it and object_store does not give by itself:
//!
//! - **Durability on local disks.** object_store's local store renames and
//!   links files into place without an fsync; after a power loss a file the
//!   protocol relies on (a commit) could survive while one before it (the
//!   sink's manifest) does not. Every write to a local location fsyncs the
//!   file and its directory (and, the first time, the directories above it)
//!   before it returns.
//! - **Create-only writes that survive retries.** A create whose response is
//!   lost (a timeout, a 500 after the server stored it) is retried by the
//!   client and then meets its own object: [`Storage::create`] reads back what
//!   is there and calls the write done when it holds the same bytes.
//! - **Errors that say who must act.** A server that fails or cannot be
//!   reached gives [`Error::Unavailable`] (a retry can help: the runner
//!   restarts from the checkpoint with backoff); a refused credential or a
//!   missing bucket gives [`Error::Storage`] (the user must act).
//!
//! For S3 the endpoint, region and credentials come from the environment, as
//! the AWS tools read them (`AWS_ENDPOINT_URL`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP=true` for a
//! plain-HTTP endpoint), so S3-compatible servers work and a pod takes them
//! from a Secret. Requests time out after 30 s (`AWS_TIMEOUT` overrides it)
//! and failed requests are retried 4 times within 20 s before the error
//! reaches the runner.

use std::collections::HashSet;
use std::path::{Path as LocalPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig,
};

use crate::{Error, Result};

/// What a create-only write found.
#[derive(Debug, PartialEq)]
pub enum Created {
    /// The object was written (or had been, by an earlier attempt of this
    /// very write).
    Written,
    /// Another writer created it first; these are its bytes.
    Exists(Bytes),
}

/// An object store rooted at a location.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// The root directory when the location is local: writes are fsynced.
    local: Option<PathBuf>,
    /// The location as the user wrote it, without a trailing `/`.
    location: String,
    /// Local directories already fsynced into their parents.
    synced_dirs: Arc<Mutex<HashSet<PathBuf>>>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("location", &self.location)
            .finish()
    }
}

/// Checks that `location` names something this engine can write to, without
/// touching it; `field` is the spec field it comes from, for the message.
pub fn check_location(location: &str, field: &str) -> Result<()> {
    if let Some(rest) = location.strip_prefix("s3://") {
        if rest.split('/').next().is_none_or(str::is_empty) {
            return Err(Error::Unsupported {
                path: field.to_owned(),
                message: format!("{location:?} names no bucket: write s3://BUCKET/PREFIX"),
            });
        }
        return Ok(());
    }
    if let Some((scheme, _)) = location.split_once("://")
        && scheme != "file"
    {
        return Err(Error::Unsupported {
            path: field.to_owned(),
            message: format!(
                "{location:?} uses the scheme {scheme:?}: use a local path, file://... or s3://bucket/prefix (gs:// and az:// are not built into this engine yet)"
            ),
        });
    }
    Ok(())
}

impl Storage {
    /// Opens `location`: `s3://bucket/prefix`, a local path or `file://...`
    /// (a local directory is created when missing). `field` names the spec
    /// field the location comes from, for errors.
    pub fn open(location: &str, field: &str) -> Result<Self> {
        check_location(location, field)?;
        let trimmed = location.trim_end_matches('/').to_owned();
        if location.starts_with("s3://") {
            return Ok(Self {
                store: s3_store(location)?,
                local: None,
                location: trimmed,
                synced_dirs: Arc::default(),
            });
        }
        let dir = location.strip_prefix("file://").unwrap_or(location);
        let error = |message: String| Error::Storage {
            file: dir.to_owned(),
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| error(format!("cannot create the directory: {e}")))?;
        let root = std::fs::canonicalize(dir)
            .map_err(|e| error(format!("cannot open the directory: {e}")))?;
        let store = LocalFileSystem::new_with_prefix(&root).map_err(|e| error(e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            local: Some(root),
            location: dir.trim_end_matches('/').to_owned(),
            synced_dirs: Arc::default(),
        })
    }

    /// The location, as written in the spec.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// `<location>/<path>`, for messages.
    pub fn name_of(&self, path: &str) -> String {
        format!("{}/{path}", self.location)
    }

    /// The local directory, when the location is one.
    pub fn local_root(&self) -> Option<&LocalPath> {
        self.local.as_deref()
    }

    /// The store beneath, rooted at the location.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    fn error(&self, path: &str, doing: &str, err: object_store::Error) -> Error {
        let file = self.name_of(path);
        let message = format!("cannot {doing} it: {err}");
        match err {
            object_store::Error::Generic { .. } | object_store::Error::JoinError { .. } => {
                Error::Unavailable {
                    what: file,
                    message,
                }
            }
            _ => Error::Storage { file, message },
        }
    }

    /// The object at `path`, or `None` when there is none.
    pub async fn get(&self, path: &str) -> Result<Option<Bytes>> {
        match self.store.get(&object_path(path)).await {
            Ok(result) => result
                .bytes()
                .await
                .map(Some)
                .map_err(|e| self.error(path, "read", e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(self.error(path, "read", err)),
        }
    }

    /// Whether an object is at `path`.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        match self.store.head(&object_path(path)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(err) => Err(self.error(path, "look up", err)),
        }
    }

    /// Writes `bytes` at `path`, replacing what is there; durable when it
    /// returns.
    pub async fn put(&self, path: &str, bytes: impl Into<Bytes>) -> Result<()> {
        self.write(path, bytes.into(), true).await
    }

    /// Writes `bytes` at `path`, replacing what is there, for an object that
    /// a manifest written next to it (in the same directory, with
    /// [`Storage::create`] or [`Storage::put`]) lists: its bytes are durable
    /// when it returns, its directory entry (locally) once that manifest's
    /// write syncs the directory, which covers every file written there
    /// before it. One directory fsync for a manifest and its files rather
    /// than one each; nothing may refer to the object before its manifest.
    pub async fn put_before_manifest(&self, path: &str, bytes: impl Into<Bytes>) -> Result<()> {
        self.write(path, bytes.into(), false).await
    }

    async fn write(&self, path: &str, bytes: Bytes, sync_dirs: bool) -> Result<()> {
        if let Some(root) = &self.local {
            // NB: object_store's local put stages the bytes in `<name>#<n>`
            // beside the file: a run killed in the middle leaves that file
            // behind, and a reader listing the directory (Spark reading a
            // file sink's output) takes it for data. A hidden temporary is
            // skipped by readers.
            let file = root.join(path);
            tokio::task::spawn_blocking(move || {
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                write_local(&file, &bytes, sync_dirs)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| Error::Storage {
                file: self.name_of(path),
                message: format!("cannot write it: {e}"),
            })?;
        } else {
            self.store
                .put(&object_path(path), PutPayload::from(bytes))
                .await
                .map_err(|e| self.error(path, "write", e))?;
        }
        if !sync_dirs || self.local.is_none() {
            return Ok(());
        }
        // The directories above, the first time (the file and its own
        // directory are durable already).
        self.sync_at(path, false).await
    }

    /// Writes `bytes` at `path` unless an object is there already (a
    /// conditional put on S3, a hard link locally); durable when it returns.
    pub async fn create(&self, path: &str, bytes: impl Into<Bytes>) -> Result<Created> {
        let bytes = bytes.into();
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&object_path(path), PutPayload::from(bytes.clone()), options)
            .await
        {
            Ok(_) => {
                self.sync(path).await?;
                Ok(Created::Written)
            }
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                // NB: a retried create meets its own first attempt: the same
                // bytes mean this write went through.
                let existing = self.get(path).await?.unwrap_or_default();
                if existing == bytes {
                    self.sync(path).await?;
                    Ok(Created::Written)
                } else {
                    Ok(Created::Exists(existing))
                }
            }
            Err(err) => Err(self.error(path, "write", err)),
        }
    }

    /// Every object under `prefix` (recursively).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let prefix_path = object_path(prefix);
        match self
            .store
            .list(Some(&prefix_path))
            .try_collect::<Vec<_>>()
            .await
        {
            Ok(objects) => Ok(objects),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(err) => Err(self.error(prefix, "list", err)),
        }
    }

    /// The names of the objects directly under `dir`.
    pub async fn list_names(&self, dir: &str) -> Result<Vec<String>> {
        let listing = match self
            .store
            .list_with_delimiter(Some(&object_path(dir)))
            .await
        {
            Ok(listing) => listing,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(err) => return Err(self.error(dir, "list", err)),
        };
        Ok(listing
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_owned))
            .collect())
    }

    /// The names under `dir/` that are numbers (batch ids, epochs,
    /// generations), ascending.
    pub async fn list_numbered(&self, dir: &str) -> Result<Vec<u64>> {
        let mut numbers: Vec<u64> = self
            .list_names(dir)
            .await?
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect();
        numbers.sort_unstable();
        Ok(numbers)
    }

    /// The objects directly under the location (not in its folders).
    pub async fn list_dir(&self) -> Result<Vec<ObjectMeta>> {
        match self.store.list_with_delimiter(None).await {
            Ok(listing) => Ok(listing.objects),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(err) => Err(self.error("", "list", err)),
        }
    }

    /// Deletes the object at `path`; one that is not there is no error.
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&object_path(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(self.error(path, "delete", err)),
        }
    }

    /// Makes a local write durable: the file, its directory, and the first
    /// time a directory is seen, the directories above it up to the root.
    async fn sync(&self, path: &str) -> Result<()> {
        self.sync_at(path, true).await
    }

    /// [`Storage::sync`]; without `file_and_dir`, only the directories above
    /// the file's own (the file and its directory are durable already).
    async fn sync_at(&self, path: &str, file_and_dir: bool) -> Result<()> {
        let Some(root) = self.local.clone() else {
            return Ok(());
        };
        let file = root.join(path);
        let synced = self.synced_dirs.clone();
        tokio::task::spawn_blocking(move || sync_local(&root, &file, &synced, file_and_dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| Error::Storage {
                file: self.name_of(path),
                message: format!("cannot make it durable (fsync): {e}"),
            })
    }
}

/// The object store's path for a key, taken as it is: a key listed from the
/// store, or a partition directory Spark-escaped (`country=de%2Fx`), names
/// the same object when written back. (`Path::from` would escape `%` again.)
fn object_path(key: &str) -> Path {
    Path::parse(key).unwrap_or_else(|_| Path::from(key))
}

fn sync_local(
    root: &LocalPath,
    file: &LocalPath,
    synced: &Mutex<HashSet<PathBuf>>,
    file_and_dir: bool,
) -> std::io::Result<()> {
    if file_and_dir {
        match std::fs::File::open(file) {
            Ok(f) => f.sync_all()?,
            // Deleted since it was written: by a newer run of the query
            // discarding this (fenced) run's attempt. Nothing of it to keep;
            // the fence stops this run at its next step.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let mut dir = file.parent();
    let mut first = true;
    while let Some(d) = dir {
        // The file's own directory always (its entry is new), unless the
        // caller synced it; the ones above only until one is known to be
        // durable already.
        let known = synced.lock().unwrap_or_else(|e| e.into_inner()).contains(d);
        if !first && known {
            break;
        }
        if !first || file_and_dir {
            fsync_dir(d)?;
        }
        synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d.to_owned());
        if d == root {
            break;
        }
        first = false;
        dir = d.parent();
    }
    Ok(())
}

/// fsyncs a directory, so that the entries made in it (renames, links,
/// new files) survive a power loss.
pub fn fsync_dir(dir: &LocalPath) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to the local file `path` durably and atomically: a hidden
/// temporary file, fsynced, renamed into place, and the directory fsynced.
pub fn write_local_atomically(path: &LocalPath, bytes: &[u8]) -> std::io::Result<()> {
    write_local(path, bytes, true)
}

/// [`write_local_atomically`]; without `sync_dir`, the directory is not
/// fsynced (the caller syncs it later, before anything refers to the file).
fn write_local(path: &LocalPath, bytes: &[u8], sync_dir: bool) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if sync_dir && let Some(dir) = path.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// For libraries that want a store rooted at the top of its bucket (or
/// filesystem) and the location as a URL (delta-rs): the store, and the URL.
pub fn root_store(location: &str, field: &str) -> Result<(Arc<dyn ObjectStore>, url::Url)> {
    check_location(location, field)?;
    let error = |message: String| Error::Storage {
        file: location.to_owned(),
        message,
    };
    if let Some(rest) = location.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or_default();
        let store = s3_store(&format!("s3://{bucket}"))?;
        let url = url::Url::parse(location.trim_end_matches('/'))
            .map_err(|e| error(format!("is not a URL: {e}")))?;
        return Ok((store, url));
    }
    let dir = location.strip_prefix("file://").unwrap_or(location);
    std::fs::create_dir_all(dir).map_err(|e| error(format!("cannot create the directory: {e}")))?;
    let dir =
        std::fs::canonicalize(dir).map_err(|e| error(format!("cannot open the directory: {e}")))?;
    let url = url::Url::from_directory_path(&dir)
        .map_err(|()| error("is not an absolute path".into()))?;
    Ok((Arc::new(LocalFileSystem::new()), url))
}

/// An S3 store rooted at `s3://bucket/prefix`.
fn s3_store(location: &str) -> Result<Arc<dyn ObjectStore>> {
    let mut builder = AmazonS3Builder::from_env()
        .with_url(location)
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 4,
            retry_timeout: Duration::from_secs(20),
        });
    if std::env::var_os("AWS_TIMEOUT").is_none() {
        builder = builder.with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "30s");
    }
    if std::env::var_os("AWS_CONNECT_TIMEOUT").is_none() {
        builder = builder.with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            "5s",
        );
    }
    let s3 = builder.build().map_err(|e| Error::Storage {
        file: location.to_owned(),
        message: format!("cannot open it: {e}"),
    })?;
    let prefix = location
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .map_or("", |(_, prefix)| prefix.trim_matches('/'));
    Ok(if prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(PrefixStore::new(s3, prefix))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_create_is_refused_once_the_object_exists_and_a_retry_of_it_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap(), "spec.x").unwrap();
        assert_eq!(
            storage.create("a/b", &b"one"[..]).await.unwrap(),
            Created::Written
        );
        // The same bytes again: a retry of the same write.
        assert_eq!(
            storage.create("a/b", &b"one"[..]).await.unwrap(),
            Created::Written
        );
        assert_eq!(
            storage.create("a/b", &b"two"[..]).await.unwrap(),
            Created::Exists(Bytes::from_static(b"one"))
        );
        assert_eq!(storage.get("a/b").await.unwrap().unwrap(), &b"one"[..]);
        assert_eq!(storage.get("a/c").await.unwrap(), None);
        assert_eq!(storage.list_names("a").await.unwrap(), ["b"]);
        storage.delete("a/b").await.unwrap();
        storage.delete("a/b").await.unwrap();
        assert!(!storage.exists("a/b").await.unwrap());
    }

    #[tokio::test]
    async fn files_written_before_their_manifest_are_in_place_without_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap(), "spec.x").unwrap();
        storage
            .put_before_manifest("s/0/1-changelog", &b"rows"[..])
            .await
            .unwrap();
        storage
            .put_before_manifest("s/0/1-changelog", &b"rows again"[..])
            .await
            .unwrap();
        storage.create("s/0/v1.json", &b"{}"[..]).await.unwrap();
        assert_eq!(
            storage.get("s/0/1-changelog").await.unwrap().unwrap(),
            &b"rows again"[..]
        );
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("s/0"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["1-changelog", "v1.json"]);
    }

    #[test]
    fn other_schemes_are_refused_naming_the_field() {
        let err = check_location("gs://b/p", "spec.checkpoint.location")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("spec.checkpoint.location: "), "{err}");
        assert!(check_location("s3:///p", "f").is_err());
        assert!(check_location("s3://b/p", "f").is_ok());
        assert!(check_location("file:///tmp/x", "f").is_ok());
    }
}
