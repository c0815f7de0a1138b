//! PTX parser and interpreter (placeholder; being written).
