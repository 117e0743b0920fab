//! Testbed: network namespaces, S3 servers and agent processes for end-to-end tests.
