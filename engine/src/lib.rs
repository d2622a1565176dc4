//! ringproxy
