//! The programs people and benchmark runs use against a node: the `hamgam`
//! command line ([`cli`]) and the `hamgam-bench` load tool ([`bench`]).
//! Both speak to nodes only through the SDK (`hamgam-client`).

pub mod bench;
pub mod cli;
mod profile;
