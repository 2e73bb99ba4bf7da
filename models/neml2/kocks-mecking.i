# neml2
# Kocks-Mecking viscoplasticity with temperature-dependent Voce hardening: an austenitic
# stainless steel from 300 to 1200 K and from 1e-6 to 1 /s (MPa, s, K). Card:
# kocks-mecking.toml; equations and parameters: docs/neml2.md.
#
# Small strain, J2 plasticity, uniaxial stress through mixed control (the axial strain given,
# the other five stress components zero). With the shear modulus mu(T), Boltzmann's constant
# k and the Burgers vector b (mm, so that stresses are in MPa):
#   yield stress            sy = exp(C) mu
#   hardening               h = R(T) (1 - exp(-d(T) ep))        R, d: tables over T
#   normalised activation   g = k T / (mu b^3) ln(eps0 / ep_rate_eff)
#   g >= g0 = (C - B) / A:  rate dependent: Perzyna flow on the overstress over zero yield,
#                           exponent n = -mu b^3 / (k T A), stress scale exp(B) mu (eps0)^(k T A / (mu b^3))
#   g <  g0:                rate independent: f <= 0, flow rate >= 0, f * flow rate = 0
#                           (Fischer-Burmeister complementarity)
# blended by a smooth (tanh) switch. Stress and ep are integrated by backward Euler; the
# unknowns are the mixed-control state (axial stress, lateral strains), ep and the
# rate-independent flow rate.
#
# Calibrated in kocks-mecking.toml: A_value, B_value, C_value (the Kocks-Mecking slope,
# intercept and horizontal line) and the four ordinates of each hardening table
# (R_ordinate_0..3, d_ordinate_0..3 at 300, 600, 900, 1200 K).

[Tensors]
  # knots of the temperature tables; the table axis is a sub-batch dimension
  [T_knots]
    type = Python
    expr = 'Scalar([300.0, 600.0, 900.0, 1200.0]).sub_batch.retag(1)'
  []
  [mu_knots]
    type = Python
    expr = 'Scalar([76670.0, 70800.0, 63400.0, 52800.0]).sub_batch.retag(1)'
  []
  [E_knots]
    type = Python
    expr = 'Scalar([199342.0, 184080.0, 164840.0, 137280.0]).sub_batch.retag(1)'
  []
  [R_knots]
    type = Python
    expr = 'Scalar([320.0, 240.0, 130.0, 60.0]).sub_batch.retag(1)'
  []
  [d_knots]
    type = Python
    expr = 'Scalar([25.0, 20.0, 15.0, 10.0]).sub_batch.retag(1)'
  []
[]

[Models]
  # ---- calibrated constants and temperature tables
  [A]
    type = ScalarConstantParameter
    value = -8.7
  []
  [B]
    type = ScalarConstantParameter
    value = -0.75
  []
  [C]
    type = ScalarConstantParameter
    value = -5.4
  []
  [mu]
    type = ScalarLinearInterpolation
    argument = 'temperature'
    abscissa = 'T_knots'
    ordinate = 'mu_knots'
  []
  [E]
    type = ScalarLinearInterpolation
    argument = 'temperature'
    abscissa = 'T_knots'
    ordinate = 'E_knots'
  []
  [R]
    type = ScalarLinearInterpolation
    argument = 'temperature'
    abscissa = 'T_knots'
    ordinate = 'R_knots'
  []
  [d]
    type = ScalarLinearInterpolation
    argument = 'temperature'
    abscissa = 'T_knots'
    ordinate = 'd_knots'
  []
  # ---- yield surface and hardening
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
  [hardening]
    type = VoceIsotropicHardening
    saturated_hardening = 'R'
    saturation_rate = 'd'
  []
  [km_yield_stress]
    type = KocksMeckingYieldStress
    shear_modulus = 'mu'
    C = 'C'
  []
  [yield_surface]
    type = YieldFunction
    yield_stress = 'km_yield_stress'
    isotropic_hardening = 'isotropic_hardening'
  []
  [yield_surface_no_sy]
    type = YieldFunction
    yield_stress = 0
    isotropic_hardening = 'isotropic_hardening'
    yield_function = 'overstress_no_sy'
  []
  [flow_surface]
    type = ComposedModel
    models = 'vonmises yield_surface'
  []
  [normality]
    type = Normality
    model = 'flow_surface'
    function = 'yield_function'
    from = 'mandel_stress isotropic_hardening'
    to = 'flow_direction isotropic_hardening_direction'
  []
  # ---- the two flow rules and the switch between them
  [rate_independent]
    type = FBComplementarity
    a = 'yield_function'
    a_inequality = 'LE'
    b = 'flow_rate_ri'
  []
  [km_exponent]
    type = KocksMeckingRateSensitivity
    A = 'A'
    shear_modulus = 'mu'
    k = 1.38064e-20
    b = 2.474e-7
  []
  [km_stress_scale]
    type = KocksMeckingFlowViscosity
    A = 'A'
    B = 'B'
    shear_modulus = 'mu'
    k = 1.38064e-20
    b = 2.474e-7
    eps0 = 1e10
  []
  [rate_dependent]
    type = PerzynaPlasticFlowRate
    reference_stress = 'km_stress_scale'
    exponent = 'km_exponent'
    yield_function = 'overstress_no_sy'
    flow_rate = 'flow_rate_rd'
  []
  [effective_strain_rate]
    type = SR2Invariant
    invariant_type = 'EFFECTIVE_STRAIN'
    tensor = 'strain_rate'
    invariant = 'effective_strain_rate'
  []
  [activation]
    type = KocksMeckingActivationEnergy
    strain_rate = 'effective_strain_rate'
    shear_modulus = 'mu'
    k = 1.38064e-20
    b = 2.474e-7
    eps0 = 1e10
  []
  [g0]
    type = KocksMeckingIntercept
    A = 'A'
    B = 'B'
    C = 'C'
  []
  [flow_rate]
    type = KocksMeckingFlowSwitch
    activation_energy = 'activation_energy'
    g0 = 'g0'
    rate_independent_flow_rate = 'flow_rate_ri'
    rate_dependent_flow_rate = 'flow_rate_rd'
    sharpness = 100.0
  []
  [plastic_strain_rate]
    type = AssociativePlasticFlow
  []
  [ep_rate]
    type = AssociativeIsotropicPlasticHardening
  []
  # ---- elasticity, time integration, mixed control
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
  [integrate_ep]
    type = ScalarBackwardEulerTimeIntegration
    variable = 'equivalent_plastic_strain'
  []
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
    models = 'hardening elasticity activation mandel_stress vonmises yield_surface
              yield_surface_no_sy normality ep_rate plastic_strain_rate strain_rate
              elastic_strain_rate rate_independent rate_dependent flow_rate integrate_ep
              integrate_stress effective_strain_rate mixed mixed_old'
  []
[]

[EquationSystems]
  [eq_sys]
    type = NonlinearSystem
    model = 'residual'
    unknowns = 'mixed_state equivalent_plastic_strain flow_rate_ri'
    residuals = 'stress_residual equivalent_plastic_strain_residual complementarity'
  []
[]
