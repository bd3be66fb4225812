//! Environments: the named root filesystems sessions start from (`Python3`, `Nodejs`, ...).
//! Owns their definitions and on-disk layout; starts nothing.
