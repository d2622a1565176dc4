//! ringload: the load generator and test backends bundled with ringproxy.
