"""NAT lab: real NATs in network namespaces, coturn, and peers that must cross them (marker ``netlab``)."""
