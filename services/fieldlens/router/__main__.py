"""Router service entry point: `python -m fieldlens.router`."""

if __name__ == "__main__":
    from fieldlens.common.runtime import configure_grpc_core

    # Before the service imports grpc: gRPC's core reads its options once, when it loads.
    configure_grpc_core()

    from fieldlens.router.service import main

    main()
