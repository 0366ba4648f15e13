//! The byte form of a stored invocation and of a dead letter: a version byte, then fields, each
//! variable-length one prefixed by its u32 LE length.

use bytes::Bytes;

use super::{DeadLetter, Invocation};

/// Version byte at the start of every encoded invocation.
const RECORD_VERSION: u8 = 1;
/// Version byte at the start of every encoded dead letter.
const DEAD_VERSION: u8 = 1;

pub(super) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

pub(super) fn encode(inv: &Invocation) -> Vec<u8> {
    let headers: usize = inv.headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum();
    let mut out = Vec::with_capacity(
        64 + inv.call_id.len() + inv.path_and_query.len() + headers + inv.body.len(),
    );
    out.push(RECORD_VERSION);
    out.extend_from_slice(&inv.accepted_unix_ms.to_le_bytes());
    put_bytes(&mut out, inv.call_id.as_bytes());
    put_bytes(&mut out, inv.path_and_query.as_bytes());
    match &inv.callback {
        Some(url) => {
            out.push(1);
            put_bytes(&mut out, url.as_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(inv.headers.len() as u32).to_le_bytes());
    for (name, value) in &inv.headers {
        put_bytes(&mut out, name.as_bytes());
        put_bytes(&mut out, value);
    }
    put_bytes(&mut out, &inv.body);
    out
}

pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub(super) fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub(super) fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub(super) fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub(super) fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(super) fn string(&mut self) -> Result<String, &'static str> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "invalid utf-8")
    }
}

/// When an encoded invocation was accepted, and its call id, read without decoding the rest.
pub(super) fn head(data: &[u8]) -> Result<(u64, String), &'static str> {
    let mut r = Reader(data);
    if r.u8()? != RECORD_VERSION {
        return Err("unknown record version");
    }
    let accepted_unix_ms = r.u64()?;
    Ok((accepted_unix_ms, r.string()?))
}

/// The encoded invocation inside an encoded dead letter.
pub(super) fn dead_invocation(data: &[u8]) -> Result<&[u8], &'static str> {
    let mut r = Reader(data);
    if r.u8()? != DEAD_VERSION {
        return Err("unknown dead-letter version");
    }
    r.take(8 + 4 + 2)?;
    r.bytes()?;
    r.bytes()
}

pub(super) fn decode(data: &[u8]) -> Result<Invocation, &'static str> {
    let mut r = Reader(data);
    if r.u8()? != RECORD_VERSION {
        return Err("unknown record version");
    }
    let accepted_unix_ms = r.u64()?;
    let call_id = r.string()?;
    let path_and_query = r.string()?;
    let callback = match r.u8()? {
        0 => None,
        1 => Some(r.string()?),
        _ => return Err("invalid callback flag"),
    };
    let n = r.u32()? as usize;
    let mut headers = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let name = r.string()?;
        let value = Bytes::copy_from_slice(r.bytes()?);
        headers.push((name, value));
    }
    let body = Bytes::copy_from_slice(r.bytes()?);
    if !r.0.is_empty() {
        return Err("trailing bytes");
    }
    Ok(Invocation {
        call_id,
        path_and_query,
        headers,
        body,
        callback,
        accepted_unix_ms,
    })
}

pub(super) fn encode_dead(
    record: &[u8],
    attempts: u32,
    status: u16,
    reason: &str,
    at: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.len() + reason.len() + 32);
    out.push(DEAD_VERSION);
    out.extend_from_slice(&at.to_le_bytes());
    out.extend_from_slice(&attempts.to_le_bytes());
    out.extend_from_slice(&status.to_le_bytes());
    put_bytes(&mut out, reason.as_bytes());
    put_bytes(&mut out, record);
    out
}

pub(super) fn decode_dead(seq: u64, data: &[u8]) -> Result<DeadLetter, &'static str> {
    let mut r = Reader(data);
    if r.u8()? != DEAD_VERSION {
        return Err("unknown dead-letter version");
    }
    let dead_unix_ms = r.u64()?;
    let attempts = r.u32()?;
    let status = r.u16()?;
    let reason = r.string()?;
    let invocation = decode(r.bytes()?)?;
    Ok(DeadLetter {
        seq,
        invocation,
        attempts,
        status,
        reason,
        dead_unix_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation() -> Invocation {
        Invocation {
            call_id: "call-2".into(),
            path_and_query: "/p/2?q=1".into(),
            headers: vec![
                ("x-a".into(), Bytes::from_static(b"1")),
                ("x-b".into(), Bytes::from_static(b"\xff")),
            ],
            body: Bytes::from(vec![2; 100]),
            callback: Some("http://127.0.0.1:1/cb".into()),
            accepted_unix_ms: 1_700_000_000_002,
        }
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let inv = invocation();
        assert_eq!(decode(&encode(&inv)).unwrap(), inv);
        let mut bad = encode(&inv);
        bad.truncate(bad.len() - 1);
        assert!(decode(&bad).is_err());
        assert!(decode(&[9]).is_err());
    }

    #[test]
    fn dead_letters_round_trip() {
        let inv = invocation();
        let dead = decode_dead(7, &encode_dead(&encode(&inv), 5, 502, "refused", 42)).unwrap();
        assert_eq!((dead.seq, dead.attempts, dead.status), (7, 5, 502));
        assert_eq!((dead.reason.as_str(), dead.dead_unix_ms), ("refused", 42));
        assert_eq!(dead.invocation, inv);
        let letter = encode_dead(&encode(&inv), 5, 502, "refused", 42);
        assert_eq!(dead_invocation(&letter).unwrap(), encode(&inv).as_slice());
        assert_eq!(
            head(&encode(&inv)).unwrap(),
            (inv.accepted_unix_ms, inv.call_id)
        );
    }
}
