//! Per-rank supervision tree (ractor). Empty until the multi-rank work lands.
