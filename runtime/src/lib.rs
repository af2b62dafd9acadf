//! Coordinator, membership, detectors, data-plane transport and collectives. Empty until the control-plane and data-plane work lands.
