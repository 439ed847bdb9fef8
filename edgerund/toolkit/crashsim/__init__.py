"""Power-cut consistency checker in the style of ALICE (Pillai et al., OSDI 2014).

A SIGKILL leaves the page cache intact, so kill -9 tests never show whether the fsync
ordering of a store is right. This package records the file-system operations of a real
run (strace: every open/write/pwrite/rename/unlink/mkdir/symlink/fsync of the daemon and
its threads and children), replays them into an in-memory model of the directory tree,
and enumerates the states a power cut may leave on a POSIX file system:

* file data is durable only up to the last fsync/fdatasync of that file;
* a directory entry (create, rename, unlink, mkdir, symlink) is durable only after an
  fsync of the directory holding it (both directories for a rename);
* anything not yet durable may be lost, independently of the rest (so later operations
  can persist while earlier ones do not: reordering), and a write that is not durable
  may persist as a prefix of whole blocks (torn appends, as SQLite's WAL must survive).

Each distinct state is materialised in a directory and handed to the same start-up
recovery the daemon runs (the slot repository; the spool's open path), and the result is
checked: exactly the old or the new model is active and verifies against its signed
manifest, and every telemetry batch whose append was acknowledged before the crash point
is still in the spool.

Modules: `trace` parses strace output into operations (pure), `fsmodel` replays them and
enumerates crash states (pure), `record` runs the scenarios under strace, `check`
materialises states and runs recovery; `python -m edgerund.toolkit.crashsim` runs it all.
This is a development tool: the daemon never imports it.
"""
