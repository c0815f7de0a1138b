//! devproxy
