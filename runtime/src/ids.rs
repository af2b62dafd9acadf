//! Newtypes for the identifiers that cross process boundaries.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $t);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// A rank's index in the world of one generation (0..world).
    Rank(u32)
);
id!(
    /// An optimizer step: the number of steps committed before it.
    Step(u64)
);
id!(
    /// A membership epoch. Bumped on every membership change; never decreases (G-1).
    Generation(u64)
);
