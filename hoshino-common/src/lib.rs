//! Types shared between the eBPF classifier and the agent.
#![no_std]
