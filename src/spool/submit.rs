//! Accepting an event: the only way work enters the spool.
//!
//! Order of a submit, each step atomic:
//! 1. (with an Idempotency-Key) `idem/<sha256(key)>` is created with link(),
//!    naming the ID; a later submit with the same key finds it and gets the
//!    same event (or a conflict when its body differs);
//! 2. the queue entry is staged as `tmp/<host>.<pid>.<n>.queue.<id>`: this is
//!    the journal that lets recovery finish step 4 after a crash;
//! 3. `event.json` is written into a staging directory; a barrier (group
//!    commit, see `atomic`) puts both on disk; the directory is renamed to
//!    `events/<id>` whole, so an event directory is never seen incomplete;
//! 4. the staged entry is linked to `queue/<id>`; a second barrier puts both
//!    new names on disk; then the staging name is removed.
//!
//! A crash before step 3 leaves only staging files (removed by recovery); a
//! crash between 3 and 4 leaves the journal, which recovery publishes. The
//! client is answered only after step 4, so an event it was told about is
//! always queued.

use std::collections::BTreeMap;
use std::fs;
use std::io;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::atomic::{publish_staged, Durability};
use super::ids::{EventId, HandlerType};
use super::records::{Envelope, QueueEntry, Status, Timestamp};
use super::{read_if_exists, IoContext, Result, Spool, SpoolError};

/// What a submitter hands over.
pub struct NewEvent {
    pub kind: HandlerType,
    pub payload: Box<RawValue>,
    pub headers: BTreeMap<String, String>,
    pub max_attempts: u32,
    pub timeout_secs: f64,
    pub idempotency_key: Option<String>,
}

/// The outcome of a submit.
#[derive(Debug)]
pub enum Submitted {
    /// A new event was queued.
    Created(Status),
    /// The Idempotency-Key was seen before with the same body: this is its event.
    Existing(Status),
    /// The Idempotency-Key was seen before with another body (or type).
    KeyConflict { existing: EventId },
}

#[derive(Serialize, Deserialize)]
struct IdemRecord {
    id: String,
    fingerprint: String,
}

/// The suffix of a staged queue entry's name: `.queue.<id>`.
pub const JOURNAL_MARK: &str = ".queue.";

impl Spool {
    pub fn submit(&self, new: NewEvent) -> Result<Submitted> {
        let id = match &new.idempotency_key {
            None => EventId::generate(),
            Some(key) => match self.reserve_key(key, &fingerprint(&new))? {
                Ok(id) => id,
                Err(conflict) => return Ok(conflict),
            },
        };
        let env = Envelope {
            id: id.as_str().to_owned(),
            kind: new.kind.as_str().to_owned(),
            submitted_at: Timestamp::now(),
            max_attempts: new.max_attempts,
            timeout: new.timeout_secs,
            headers: new.headers,
            idempotency_key: new.idempotency_key,
            payload: new.payload,
        };
        let entry = QueueEntry::now(&new.kind);
        if self.create_event(&id, &env, &entry)? {
            Ok(Submitted::Created(Status::initial(&env)))
        } else {
            self.existing(&id)
        }
    }

    /// Creates `idem/<hash>` for a key, or reads the event it already names.
    /// `Ok(Ok(id))`: go on and create (or finish creating) event `id`.
    fn reserve_key(&self, key: &str, fingerprint: &str) -> Result<Result<EventId, Submitted>> {
        let path = self.dir("idem").join(hex(&Sha256::digest(key.as_bytes())));
        let fresh = IdemRecord {
            id: EventId::generate().to_string(),
            fingerprint: fingerprint.to_owned(),
        };
        let bytes = serde_json::to_vec(&fresh).expect("serializable");
        let record = if self
            .writer()
            .create_new(&path, &bytes, Durability::Durable)
            .at("write", &path)?
        {
            fresh
        } else {
            let bytes = read_if_exists(&path)?.unwrap_or_default();
            serde_json::from_slice(&bytes).map_err(|e| SpoolError::Damaged {
                path: path.clone(),
                detail: e.to_string(),
            })?
        };
        let id = EventId::parse(&record.id).map_err(|e| SpoolError::Damaged {
            path,
            detail: e.to_string(),
        })?;
        if record.fingerprint != fingerprint {
            return Ok(Err(Submitted::KeyConflict { existing: id }));
        }
        // The key's event may exist already (a repeat), or not yet (its first
        // submitter crashed, or is still writing): create_event settles both.
        Ok(Ok(id))
    }

    fn existing(&self, id: &EventId) -> Result<Submitted> {
        match self.read_status(id)? {
            Some(status) => Ok(Submitted::Existing(status)),
            None => Err(SpoolError::Damaged {
                path: self.event_dir(id),
                detail: "event directory vanished right after it was created".into(),
            }),
        }
    }

    /// Steps 2–4 above. Returns false when `events/<id>` already existed.
    fn create_event(&self, id: &EventId, env: &Envelope, entry: &QueueEntry) -> Result<bool> {
        let final_dir = self.event_dir(id);
        if final_dir.join("event.json").exists() {
            return Ok(false);
        }
        let w = self.writer();
        let entry_bytes = serde_json::to_vec(entry).expect("serializable");
        let journal = w
            .stage_unflushed(&entry_bytes, &format!("{JOURNAL_MARK}{id}"))
            .at("stage a queue entry in", &self.dir("tmp"))?;
        let result = self.place_event_dir(id, env).and_then(|placed| {
            if placed {
                let dest = self.queue_path(id);
                publish_staged(&journal, &dest).at("publish", &dest)?;
                // The second barrier: both new names are on disk.
                w.barrier().at("sync", &self.dir("queue"))?;
            }
            Ok(placed)
        });
        let _ = fs::remove_file(&journal);
        result
    }

    fn place_event_dir(&self, id: &EventId, env: &Envelope) -> Result<bool> {
        let w = self.writer();
        let staging = w.staging_path(".event");
        let write = || -> io::Result<()> {
            fs::create_dir(&staging)?;
            let file = staging.join("event.json");
            fs::write(&file, serde_json::to_vec_pretty(env).expect("serializable"))?;
            // The first barrier: the journal and the staged directory are on
            // disk before either gets its final name.
            w.barrier()
        };
        let staged = write().at("stage the event directory", &staging);
        let placed = staged.and_then(|()| match fs::rename(&staging, self.event_dir(id)) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => {
                Ok(false)
            }
            Err(e) if self.event_dir(id).join("event.json").exists() && !staging.exists() => {
                tracing::debug!(%id, error = %e, "rename reported an error but took effect");
                Ok(true)
            }
            Err(e) => Err(SpoolError::Io {
                op: "create",
                path: self.event_dir(id),
                source: e,
            }),
        });
        if !matches!(placed, Ok(true)) {
            let _ = fs::remove_dir_all(&staging);
        }
        placed
    }

    /// Links a staged queue entry to `queue/<id>` (no-op when already there).
    pub(crate) fn publish_journal(&self, journal: &std::path::Path, id: &EventId) -> Result<()> {
        let dest = self.queue_path(id);
        publish_staged(journal, &dest).at("publish", &dest)?;
        // A barrier, as in a submit: the crash may have come before the
        // event directory's new name in `events/` was flushed, too.
        self.writer().barrier().at("sync", &self.dir("queue"))
    }
}

fn fingerprint(new: &NewEvent) -> String {
    let mut h = Sha256::new();
    h.update(new.kind.as_str().as_bytes());
    h.update(b"\n");
    h.update(new.payload.get().as_bytes());
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
