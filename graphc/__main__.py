from graphc.cli import main

raise SystemExit(main())
