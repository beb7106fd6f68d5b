//! `foca`'s wire format, and the handler of metadata broadcasts that keeps each node's newest
//! [`Meta`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut};
use foca::{BroadcastHandler, Header, Invalidates};

use super::member::{MemberId, Meta};

/// Most nodes whose metadata is remembered (far above any real cluster).
const MAX_METAS: usize = 4096;

/// `foca`'s wire format for headers and members: MessagePack with field names, so a newer
/// node may add fields that an older one ignores.
pub(super) struct Codec;

/// A SWIM message that does not encode or decode.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct CodecError(String);

impl foca::Codec<MemberId> for Codec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<MemberId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        rmp_serde::encode::write_named(&mut buf.writer(), header)
            .map_err(|e| CodecError(e.to_string()))
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<MemberId>, Self::Error> {
        rmp_serde::from_read(buf.reader()).map_err(|e| CodecError(e.to_string()))
    }

    fn encode_member(
        &mut self,
        member: &foca::Member<MemberId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        rmp_serde::encode::write_named(&mut buf.writer(), member)
            .map_err(|e| CodecError(e.to_string()))
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<foca::Member<MemberId>, Self::Error> {
        rmp_serde::from_read(buf.reader()).map_err(|e| CodecError(e.to_string()))
    }
}

/// Identifies a metadata broadcast: a newer one of the same node replaces it in the queue.
pub(super) struct MetaKey {
    id: String,
    seq: u64,
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.id == other.id && self.seq >= other.seq
    }
}

/// The newest metadata of every node, filled by the broadcast handler.
pub(super) type Metas = Arc<Mutex<HashMap<String, Meta>>>;

pub(super) fn lock(m: &Metas) -> std::sync::MutexGuard<'_, HashMap<String, Meta>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the newest [`Meta`] of each node; tells `foca` to pass on only what is new.
pub(super) struct MetaHandler {
    pub(super) metas: Metas,
    pub(super) changed: Arc<std::sync::atomic::AtomicBool>,
}

impl BroadcastHandler<MemberId> for MetaHandler {
    type Key = MetaKey;
    type Error = CodecError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&MemberId>,
    ) -> Result<Option<MetaKey>, CodecError> {
        let meta: Meta = rmp_serde::from_slice(data).map_err(|e| CodecError(e.to_string()))?;
        let mut metas = lock(&self.metas);
        let newer = metas
            .get(&meta.id)
            .is_none_or(|m| (meta.started_ms, meta.seq) > (m.started_ms, m.seq));
        if !newer || (metas.len() >= MAX_METAS && !metas.contains_key(&meta.id)) {
            return Ok(None);
        }
        let key = MetaKey {
            id: meta.id.clone(),
            seq: meta.seq,
        };
        metas.insert(meta.id.clone(), meta);
        // Our own broadcasts (no sender) change nothing in the view.
        if sender.is_some() {
            self.changed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Some(key))
    }
}
