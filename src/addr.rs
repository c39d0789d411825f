//! Addresses (placeholder, being written).
