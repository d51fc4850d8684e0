//! `colony-examples` will hold trainers built on Colony and the swarm demo that the README's first command
//! runs. Nothing is implemented here yet (see `docs/architecture.md`).
