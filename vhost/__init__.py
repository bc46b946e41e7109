"""vhost-user backend (device side) for virtio-net; knows nothing of softnic."""
