//! Byte encodings of RocksDB keys. Every integer is big-endian so that RocksDB's
//! byte order is numeric order.

/// A revision: the main revision (one per write request) and the sub-revision (one
/// per key written by that request), as in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rev {
    pub main: i64,
    pub sub: i64,
}

impl Rev {
    pub fn encode(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(self.main as u64).to_be_bytes());
        b[8..].copy_from_slice(&(self.sub as u64).to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Rev> {
        if b.len() != 16 {
            return None;
        }
        let main = u64::from_be_bytes(b[..8].try_into().ok()?) as i64;
        let sub = u64::from_be_bytes(b[8..].try_into().ok()?) as i64;
        Some(Rev { main, sub })
    }
}

pub fn u64_key(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub fn decode_u64_key(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Order-preserving, prefix-free encoding of a user key, so that
/// `escape(k) ++ rev` sorts by key first, then by revision, for any bytes in `k`:
/// 0x00 becomes 0x00 0xFF, and the key ends with 0x00 0x01.
pub fn escape_key(key: &[u8], out: &mut Vec<u8>) {
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

/// Splits `escape(k) ++ rest` into `k` and `rest`.
pub fn unescape_key(enc: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut key = Vec::with_capacity(enc.len());
    let mut i = 0;
    while i < enc.len() {
        let b = enc[i];
        if b == 0 {
            match enc.get(i + 1)? {
                0xFF => {
                    key.push(0);
                    i += 2;
                }
                0x01 => return Some((key, &enc[i + 2..])),
                _ => return None,
            }
        } else {
            key.push(b);
            i += 1;
        }
    }
    None
}

/// The history-index key of `key` at `rev`.
pub fn hist_key(key: &[u8], rev: Rev) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 18);
    escape_key(key, &mut out);
    out.extend_from_slice(&rev.encode());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_keys_sort_like_keys_then_revisions() {
        let keys: [&[u8]; 6] = [b"", b"\0", b"\0\0", b"a", b"a\0", b"ab"];
        let mut encoded: Vec<Vec<u8>> = Vec::new();
        for k in keys {
            for main in [1, 2, 300] {
                encoded.push(hist_key(k, Rev { main, sub: 0 }));
            }
        }
        let mut sorted = encoded.clone();
        sorted.sort();
        assert_eq!(encoded, sorted);
        for (i, k) in keys.iter().enumerate() {
            let (back, rest) = unescape_key(&encoded[i * 3]).unwrap();
            assert_eq!(back, k.to_vec());
            assert_eq!(Rev::decode(rest), Some(Rev { main: 1, sub: 0 }));
        }
    }
}
