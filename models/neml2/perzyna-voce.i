# neml2
# bayescal's built-in perzyna-voce model written as a NEML2 equation system, for checking the
# NEML2 backend against the built-in model (tests/test_neml2.py) and for benchmarks/neml2.py.
#
# Uniaxial stress through mixed control (the axial strain given, the other stress
# components zero), small strain, J2 plasticity:
#   f = sigma_vm - (sy + h)                         (no sqrt(2/3) factor: then in 1D the
#   p_dot = <f / eta>^n                              flow rate is the axial plastic strain
#   Ep_dot = p_dot * N,  N = d sigma_vm / d M        rate, as in the built-in model)
#   h_dot = d Rinf (1 - h / Rinf) p_dot = d (Rinf - h) p_dot
#   sigma_dot = C : (E_dot - Ep_dot)                 (isotropic elasticity, E and nu)
# Stress and h are integrated by backward Euler, as in the built-in model, so the two agree
# to the Newton tolerance in the axial stress. The six parameters are ScalarConstantParameter
# blocks, named E_value, sy_value, Rinf_value, d_value, eta_value, n_value in a card.

[Models]
  [E]
    type = ScalarConstantParameter
    value = 200000
  []
  [sy]
    type = ScalarConstantParameter
    value = 250
  []
  [Rinf]
    type = ScalarConstantParameter
    value = 200
  []
  [d]
    type = ScalarConstantParameter
    value = 15
  []
  [eta]
    type = ScalarConstantParameter
    value = 300
  []
  [n]
    type = ScalarConstantParameter
    value = 3
  []
  # initial hardening slope d * Rinf of the slope-saturation form of Voce hardening
  [theta0]
    type = ScalarMultiplication
    from = 'd Rinf'
    to = 'theta0'
  []
  [mandel_stress]
    type = IsotropicMandelStress
    cauchy_stress = 'stress'
  []
  [vonmises]
    type = SR2Invariant
    invariant_type = 'VONMISES'
    tensor = 'mandel_stress'
    invariant = 'effective_stress'
  []
  [overstress]
    type = ScalarLinearCombination
    from = 'effective_stress isotropic_hardening sy'
    weights = '1 -1 -1'
    to = 'yield_function'
  []
  [yield_surface]
    type = ComposedModel
    models = 'vonmises overstress'
  []
  [normality]
    type = Normality
    model = 'yield_surface'
    function = 'yield_function'
    from = 'mandel_stress'
    to = 'flow_direction'
  []
  [flow_rate]
    type = PerzynaPlasticFlowRate
    reference_stress = 'eta'
    exponent = 'n'
  []
  [plastic_strain_rate]
    type = AssociativePlasticFlow
  []
  [hardening_rate]
    type = SlopeSaturationVoceIsotropicHardening
    saturated_hardening = 'Rinf'
    initial_hardening_rate = 'theta0'
  []
  [integrate_hardening]
    type = ScalarBackwardEulerTimeIntegration
    variable = 'isotropic_hardening'
  []
  [strain_rate]
    type = SR2VariableRate
    variable = 'strain'
  []
  [elastic_strain_rate]
    type = SR2LinearCombination
    from = 'strain_rate plastic_strain_rate'
    to = 'elastic_strain_rate'
    weights = '1 -1'
  []
  [elasticity]
    type = LinearIsotropicElasticity
    coefficients = 'E 0.3'
    coefficient_types = 'YOUNGS_MODULUS POISSONS_RATIO'
    strain = 'elastic_strain'
    rate_form = true
  []
  [integrate_stress]
    type = SR2BackwardEulerTimeIntegration
    variable = 'stress'
  []
  # mixed control: fixed_values holds the axial strain and zero stresses, control says which
  # is which; mixed_state holds the unknown axial stress and lateral strains
  [mixed]
    type = MixedControlSetup
    x_above = 'fixed_values'
    x_below = 'mixed_state'
    y = 'stress'
    z = 'strain'
  []
  [mixed_old]
    type = MixedControlSetup
    control = 'control~1'
    x_above = 'fixed_values~1'
    x_below = 'mixed_state~1'
    y = 'stress~1'
    z = 'strain~1'
  []
  [residual]
    type = ComposedModel
    models = 'sy d Rinf theta0 mandel_stress vonmises overstress normality flow_rate
              plastic_strain_rate hardening_rate integrate_hardening strain_rate
              elastic_strain_rate elasticity integrate_stress mixed mixed_old'
  []
[]

[EquationSystems]
  [eq_sys]
    type = NonlinearSystem
    model = 'residual'
    unknowns = 'mixed_state isotropic_hardening'
    residuals = 'stress_residual isotropic_hardening_residual'
  []
[]
