//! What every Barnacle daemon and command shares, and nothing of any one of them: process
//! set-up ([`process`]: logging, the async runtime, private unix sockets, ready files, signal
//! shutdown, the IO-flusher flag, malloc tuning, token files) and byte sizes on command lines
//! ([`units`]).

pub mod process;
pub mod units;
