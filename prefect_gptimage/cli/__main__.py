from prefect_gptimage.cli.main import main

raise SystemExit(main())
