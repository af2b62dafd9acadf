//! Control-plane API of phalanx. The `.proto` files and generated code land with the control-plane work.
