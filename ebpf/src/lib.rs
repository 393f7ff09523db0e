#![no_std]
// This file exists so the agent can name this crate as a build-dependency
// (cache invalidation); the programs are in main.rs, built for bpfel.
