//! Where instances live in the cell's KV, and their encoding.
//!
//! One key per instance: `/_cellplane/discovery/<namespace>/<service>/<id>`, its
//! value the protobuf encoding of [`Instance`] (the `mod_revision` field is not
//! stored: it is the key's own). Names never contain `/` (see `validate`), so a
//! service's instances are exactly the keys with its prefix and the checker finds
//! every instance of the cell with one range over [`ROOT`].
//!
//! The prefix is reserved: the etcd API does not refuse writes under it, but
//! anything written there by hand is treated as an instance and skipped, with a
//! warning, when it does not decode as one.

use cellplane_proto::discovery::Instance;
use cellplane_proto::mvccpb::KeyValue;
use prost::Message;

use crate::error::DiscoveryError;

/// The reserved prefix every instance key starts with.
pub const ROOT: &str = "/_cellplane/discovery/";

/// The key of one instance.
pub fn instance_key(namespace: &str, service: &str, id: &str) -> Vec<u8> {
    format!("{ROOT}{namespace}/{service}/{id}").into_bytes()
}

/// The prefix of every instance of one service.
pub fn service_prefix(namespace: &str, service: &str) -> Vec<u8> {
    format!("{ROOT}{namespace}/{service}/").into_bytes()
}

/// The value stored for `instance` (without its mod_revision).
pub fn encode(instance: &Instance) -> Vec<u8> {
    let mut stored = instance.clone();
    stored.mod_revision = 0;
    stored.encode_to_vec()
}

/// The instance a key-value holds, with the key's mod_revision and lease. The key
/// must be the instance's own: a value copied under another key is refused, so
/// a key always names what it holds.
pub fn decode(kv: &KeyValue) -> Result<Instance, DiscoveryError> {
    let corrupt = |reason: String| DiscoveryError::Corrupt {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        reason,
    };
    let mut i = Instance::decode(kv.value.as_slice())
        .map_err(|e| corrupt(format!("not an encoded Instance: {e}")))?;
    if instance_key(&i.namespace, &i.service, &i.id) != kv.key {
        return Err(corrupt(format!(
            "holds instance {:?} of service {:?} in namespace {:?}",
            i.id, i.service, i.namespace
        )));
    }
    i.mod_revision = kv.mod_revision;
    i.lease_id = kv.lease;
    Ok(i)
}

/// The instance id a key under `prefix` names.
pub fn id_of<'a>(prefix: &[u8], key: &'a [u8]) -> Option<&'a str> {
    std::str::from_utf8(key.strip_prefix(prefix)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance {
            namespace: "a".into(),
            service: "web".into(),
            id: "web-1".into(),
            address: "10.0.0.1".into(),
            port: 8080,
            tags: vec!["v2".into()],
            metadata: [("zone".to_string(), "z1".to_string())].into(),
            lease_id: 7,
            mod_revision: 99,
            ..Default::default()
        }
    }

    #[test]
    fn layout_is_the_documented_one() {
        assert_eq!(
            instance_key("a", "web", "web-1"),
            b"/_cellplane/discovery/a/web/web-1"
        );
        assert_eq!(service_prefix("a", "web"), b"/_cellplane/discovery/a/web/");
        assert_eq!(id_of(b"/p/", b"/p/id-1"), Some("id-1"));
        assert_eq!(id_of(b"/p/", b"/q/id-1"), None);
    }

    #[test]
    fn round_trip_takes_revision_and_lease_from_the_key() {
        let i = instance();
        let kv = KeyValue {
            key: instance_key("a", "web", "web-1"),
            value: encode(&i),
            mod_revision: 5,
            lease: 7,
            ..Default::default()
        };
        let back = decode(&kv).unwrap();
        assert_eq!(back.mod_revision, 5);
        assert_eq!(
            Instance {
                mod_revision: 99,
                ..back
            },
            i
        );
        // The stored value does not carry the revision.
        assert_eq!(
            Instance::decode(kv.value.as_slice()).unwrap().mod_revision,
            0
        );
    }

    #[test]
    fn junk_and_misplaced_values_are_refused() {
        let kv = KeyValue {
            key: instance_key("a", "web", "web-1"),
            value: b"\xff\xff\xff".to_vec(),
            ..Default::default()
        };
        assert!(matches!(decode(&kv), Err(DiscoveryError::Corrupt { .. })));
        let kv = KeyValue {
            key: instance_key("a", "web", "web-2"),
            value: encode(&instance()),
            ..Default::default()
        };
        let e = decode(&kv).unwrap_err().to_string();
        assert!(e.contains("web-1"), "{e}");
    }
}
