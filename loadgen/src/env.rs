//! An environment started by `cellplane up`, as its `<data-dir>/up.json` describes
//! it (written by `crates/cellplane/src/up.rs`): the supervisor's pid and every
//! member and router with its pid (0 while not running), endpoints, log and
//! command line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpEnvironment {
    pub supervisor_pid: u32,
    /// The directory cell's name.
    pub directory: String,
    pub processes: Vec<UpProcess>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpProcess {
    /// `member` or `router`.
    pub kind: String,
    /// The member's cell; empty for a router.
    pub cell: String,
    pub id: u64,
    /// 0 while not running.
    pub pid: u32,
    /// The etcd API address.
    pub client: String,
    pub http: String,
    pub log: PathBuf,
    /// The command line `up` started it with (absent in files of older versions).
    #[serde(default)]
    pub argv: Vec<String>,
}

impl UpProcess {
    pub fn is_router(&self) -> bool {
        self.kind == "router"
    }

    /// `beta/2`, `router/1`: the name of its restart request (see `up.rs`).
    pub fn label(&self) -> String {
        if self.is_router() {
            format!("router/{}", self.id)
        } else {
            format!("{}/{}", self.cell, self.id)
        }
    }

    /// The file that asks `up` to start this (stopped) process again.
    pub fn restart_request(&self, data_dir: &Path) -> PathBuf {
        let name = if self.is_router() {
            format!("router-{}", self.id)
        } else {
            format!("member-{}-{}", self.cell, self.id)
        };
        data_dir.join("restart").join(name)
    }
}

/// Why an environment could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("cannot read {path}: {message} (is `cellplane up --data-dir {dir}` running?)")]
    Read {
        path: String,
        dir: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

impl UpEnvironment {
    /// Reads `<data_dir>/up.json`.
    pub fn read(data_dir: &Path) -> Result<UpEnvironment, EnvError> {
        let path = data_dir.join("up.json");
        let bytes = std::fs::read(&path).map_err(|e| EnvError::Read {
            path: path.display().to_string(),
            dir: data_dir.display().to_string(),
            message: e.to_string(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| EnvError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Names of the cells with members, the directory excluded, in name order.
    pub fn cells(&self) -> Vec<String> {
        let mut c: Vec<String> = self
            .processes
            .iter()
            .filter(|p| !p.is_router() && p.cell != self.directory)
            .map(|p| p.cell.clone())
            .collect();
        c.sort();
        c.dedup();
        c
    }

    pub fn members(&self, cell: &str) -> Vec<&UpProcess> {
        self.processes
            .iter()
            .filter(|p| !p.is_router() && p.cell == cell)
            .collect()
    }

    pub fn routers(&self) -> Vec<&UpProcess> {
        self.processes.iter().filter(|p| p.is_router()).collect()
    }

    pub fn find(&self, label: &str) -> Option<&UpProcess> {
        self.processes.iter().find(|p| p.label() == label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_up_writes() {
        // The shape `cellplane up` writes (crates/cellplane/src/up.rs).
        let json = r#"{
          "supervisor_pid": 10,
          "directory": "directory",
          "processes": [
            {"kind": "member", "cell": "alpha", "id": 1, "pid": 11, "client": "127.0.0.1:12379",
             "http": "127.0.0.1:12381", "log": "/d/logs/alpha-1.log",
             "argv": ["/bin/cellplane", "node", "--cell", "cells/alpha.toml", "--id", "1"]},
            {"kind": "member", "cell": "directory", "id": 1, "pid": 12, "client": "127.0.0.1:2479",
             "http": "127.0.0.1:2481", "log": "/d/logs/directory-1.log"},
            {"kind": "router", "cell": "", "id": 1, "pid": 0, "client": "127.0.0.1:2379",
             "http": "127.0.0.1:2377", "log": "/d/logs/router-1.log"}
          ]
        }"#;
        let env: UpEnvironment = serde_json::from_str(json).unwrap();
        assert_eq!(env.cells(), ["alpha"]);
        assert_eq!(env.members("alpha")[0].argv.len(), 6);
        assert_eq!(env.routers()[0].label(), "router/1");
        assert_eq!(
            env.find("alpha/1")
                .unwrap()
                .restart_request(Path::new("/d")),
            Path::new("/d/restart/member-alpha-1")
        );
    }
}
