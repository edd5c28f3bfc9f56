"""spa_core"""
