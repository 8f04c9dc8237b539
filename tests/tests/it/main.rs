//! Hamgam end to end: real node processes, QUIC on loopback, files on disk.
//!
//! One test binary; each module is one area. Nodes are started from the
//! `node-under-test` binary (the real `hamgam-node` entry point).

mod bad_input;
mod chat;
mod cli;
mod cluster;
mod crash;
mod gallery;
mod growth;
mod ledger;
mod store;
mod support;
