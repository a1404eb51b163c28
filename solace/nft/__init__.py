"""DiffusionNFT pieces: the forward-process loss, its timestep sampler and the EMA old policy."""
