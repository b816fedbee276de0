//! openraft's own storage conformance suite, run on the RocksDB log store and state
//! machine.

// openraft's `StorageError` is what its test suite returns.
#![allow(clippy::result_large_err)]

use cellplane_storage::{LogStore, NodeId, StateMachine, TypeConfig};
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let store =
            cellplane_storage::open(dir.path()).map_err(|e| openraft::StorageIOError::write(&e))?;
        let log = LogStore::new(store.clone()).map_err(|e| openraft::StorageIOError::write(&e))?;
        let sm = StateMachine::new(store)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn rocksdb_store_passes_openraft_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(RocksBuilder)?;
    Ok(())
}
