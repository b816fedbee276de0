//! A service's instances as a Watch stream follows them: applying each
//! revision's etcd events, and the difference between two snapshots.

use std::collections::BTreeMap;

use cellplane_proto::discovery::{Change, ChangeKind, Instance, WatchResponse};
use cellplane_proto::mvccpb::{Event, event::EventType};

use crate::keys;

/// The instances of one service, by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub instances: BTreeMap<String, Instance>,
}

impl Snapshot {
    /// The snapshot of the key-values of a range over the service's prefix;
    /// values that are not instances are skipped with a warning.
    pub fn from_kvs(kvs: &[cellplane_proto::mvccpb::KeyValue]) -> Snapshot {
        let mut s = Snapshot::default();
        for kv in kvs {
            match keys::decode(kv) {
                Ok(i) => {
                    s.instances.insert(i.id.clone(), i);
                }
                Err(e) => tracing::warn!(error = %e, "skipping a value that is not an instance"),
            }
        }
        s
    }

    /// Applies the events of one revision; the changes they made.
    pub fn apply(&mut self, prefix: &[u8], events: &[Event]) -> Vec<Change> {
        let before = self.clone();
        for e in events {
            let Some(kv) = &e.kv else { continue };
            let Some(id) = keys::id_of(prefix, &kv.key) else {
                continue;
            };
            if e.r#type == EventType::Delete as i32 {
                self.instances.remove(id);
                continue;
            }
            match keys::decode(kv) {
                Ok(i) => {
                    self.instances.insert(i.id.clone(), i);
                }
                Err(err) => {
                    // Not an instance (written by hand): the key holds no
                    // instance now.
                    tracing::warn!(error = %err, "skipping a value that is not an instance");
                    self.instances.remove(id);
                }
            }
        }
        diff(&before, self)
    }

    /// The response for this snapshot at `revision` with `changes`.
    pub fn response(&self, revision: i64, changes: Vec<Change>) -> WatchResponse {
        WatchResponse {
            revision,
            instances: self.instances.values().cloned().collect(),
            changes,
        }
    }

    /// Every instance as added: the changes of a first snapshot.
    pub fn all_added(&self) -> Vec<Change> {
        diff(&Snapshot::default(), self)
    }
}

/// What changed from `before` to `after`, ordered by id: an instance present only
/// after is ADDED, only before REMOVED (carrying its last state), in both but
/// different (any field, the revision included) UPDATED.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<Change> {
    let mut out = Vec::new();
    let change = |kind: ChangeKind, i: &Instance| Change {
        kind: kind as i32,
        instance: Some(i.clone()),
    };
    let mut old = before.instances.iter().peekable();
    let mut new = after.instances.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some((_, o)), None) => {
                out.push(change(ChangeKind::ChangeRemoved, o));
                old.next();
            }
            (None, Some((_, n))) => {
                out.push(change(ChangeKind::ChangeAdded, n));
                new.next();
            }
            (Some((oid, o)), Some((nid, n))) => match oid.cmp(nid) {
                std::cmp::Ordering::Less => {
                    out.push(change(ChangeKind::ChangeRemoved, o));
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push(change(ChangeKind::ChangeAdded, n));
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if o != n {
                        out.push(change(ChangeKind::ChangeUpdated, n));
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    out
}

/// The events of one watch response split by revision, in order: etcd may put
/// several revisions in one response, and each revision gets its own snapshot.
pub fn by_revision(events: &[Event]) -> Vec<(i64, &[Event])> {
    let rev = |e: &Event| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=events.len() {
        if i == events.len() || rev(&events[i]) != rev(&events[start]) {
            out.push((rev(&events[start]), &events[start..i]));
            start = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_proto::discovery::Health;
    use cellplane_proto::mvccpb::KeyValue;

    const PREFIX: &[u8] = b"/_cellplane/discovery/a/web/";

    fn inst(id: &str, health: Health) -> Instance {
        Instance {
            namespace: "a".into(),
            service: "web".into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 80,
            health: health as i32,
            ..Default::default()
        }
    }

    fn put(i: &Instance, rev: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: keys::instance_key(&i.namespace, &i.service, &i.id),
                value: keys::encode(i),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn del(id: &str, rev: i64) -> Event {
        Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: keys::instance_key("a", "web", id),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn kinds(c: &[Change]) -> Vec<(ChangeKind, String)> {
        c.iter()
            .map(|c| {
                (
                    ChangeKind::try_from(c.kind).unwrap(),
                    c.instance.as_ref().unwrap().id.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn add_update_remove_are_told_apart() {
        let mut s = Snapshot::default();
        let c = s.apply(PREFIX, &[put(&inst("i1", Health::Healthy), 2)]);
        assert_eq!(kinds(&c), [(ChangeKind::ChangeAdded, "i1".into())]);
        let c = s.apply(PREFIX, &[put(&inst("i2", Health::Healthy), 3)]);
        assert_eq!(kinds(&c), [(ChangeKind::ChangeAdded, "i2".into())]);
        let c = s.apply(PREFIX, &[put(&inst("i1", Health::Unhealthy), 4)]);
        assert_eq!(kinds(&c), [(ChangeKind::ChangeUpdated, "i1".into())]);
        assert_eq!(
            c[0].instance.as_ref().unwrap().health,
            Health::Unhealthy as i32
        );
        let c = s.apply(PREFIX, &[del("i1", 5)]);
        assert_eq!(kinds(&c), [(ChangeKind::ChangeRemoved, "i1".into())]);
        assert_eq!(
            c[0].instance.as_ref().unwrap().mod_revision,
            4,
            "a removal carries the last state"
        );
        assert_eq!(s.instances.keys().collect::<Vec<_>>(), ["i2"]);
        let r = s.response(5, c);
        assert_eq!((r.revision, r.instances.len(), r.changes.len()), (5, 1, 1));
    }

    #[test]
    fn a_rewrite_with_a_new_revision_is_an_update_and_a_noop_is_nothing() {
        let mut s = Snapshot::default();
        s.apply(PREFIX, &[put(&inst("i1", Health::Healthy), 2)]);
        let c = s.apply(PREFIX, &[put(&inst("i1", Health::Healthy), 3)]);
        assert_eq!(kinds(&c), [(ChangeKind::ChangeUpdated, "i1".into())]);
        // Deleting what is not there (another service's key, a repeat) changes nothing.
        assert!(s.apply(PREFIX, &[del("zz", 4)]).is_empty());
    }

    #[test]
    fn diff_is_ordered_by_id_and_the_first_snapshot_is_all_added() {
        let mut a = Snapshot::default();
        let mut b = Snapshot::default();
        for id in ["a", "c", "d"] {
            a.instances.insert(id.into(), inst(id, Health::Healthy));
        }
        for id in ["b", "c", "d"] {
            b.instances.insert(id.into(), inst(id, Health::Healthy));
        }
        b.instances.get_mut("d").unwrap().port = 81;
        assert_eq!(
            kinds(&diff(&a, &b)),
            [
                (ChangeKind::ChangeRemoved, "a".into()),
                (ChangeKind::ChangeAdded, "b".into()),
                (ChangeKind::ChangeUpdated, "d".into()),
            ]
        );
        assert_eq!(b.all_added().len(), 3);
        assert!(diff(&b, &b).is_empty());
    }

    #[test]
    fn junk_under_the_prefix_is_skipped() {
        let mut s = Snapshot::default();
        s.apply(PREFIX, &[put(&inst("i1", Health::Healthy), 2)]);
        let mut junk = put(&inst("i1", Health::Healthy), 3);
        junk.kv.as_mut().unwrap().value = b"not protobuf \xff".to_vec();
        let c = s.apply(PREFIX, &[junk]);
        assert_eq!(kinds(&c), [(ChangeKind::ChangeRemoved, "i1".into())]);
        let kvs = [KeyValue {
            key: keys::instance_key("a", "web", "x"),
            value: b"\xff".to_vec(),
            ..Default::default()
        }];
        assert!(Snapshot::from_kvs(&kvs).instances.is_empty());
    }

    #[test]
    fn events_split_by_revision() {
        let i = inst("i1", Health::Healthy);
        let events = [put(&i, 2), del("i2", 2), put(&i, 3), del("i1", 5)];
        let groups: Vec<(i64, usize)> = by_revision(&events)
            .iter()
            .map(|(r, e)| (*r, e.len()))
            .collect();
        assert_eq!(groups, [(2, 2), (3, 1), (5, 1)]);
        assert!(by_revision(&[]).is_empty());
    }
}
